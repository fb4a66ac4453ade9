"""`lm_eval` with the `megatrain` model type registered (lm-eval finds external models
only once imported): `python -m megatrain.lm_eval --model megatrain --model_args checkpoint=PATH --tasks ...`."""

import megatrain.lm_eval  # noqa: F401  (registers the model type)
from lm_eval.__main__ import cli_evaluate

if __name__ == "__main__":
    cli_evaluate()
