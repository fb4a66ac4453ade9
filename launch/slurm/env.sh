# Sourced by the megatrain batch scripts: find the checkout and make its Python the
# one on PATH, on every node (the environment travels to the tasks with srun).
#
#   MEGATRAIN_HOME     the megatrain checkout (default: the directory sbatch ran in)
#   MEGATRAIN_MODULES  environment modules to load first, e.g. "cuda/12.4 nccl"
#   MEGATRAIN_VENV     the virtual environment to activate (default: $MEGATRAIN_HOME/.venv,
#                      which `make install` creates, when there is one)

MEGATRAIN_HOME=${MEGATRAIN_HOME:-$SLURM_SUBMIT_DIR}
if [[ ! -f $MEGATRAIN_HOME/launch/pretrain.py ]]; then
    echo "megatrain: $MEGATRAIN_HOME is not a megatrain checkout: run sbatch from one or set MEGATRAIN_HOME" >&2
    exit 1
fi
if [[ -n ${MEGATRAIN_MODULES:-} ]]; then
    # shellcheck disable=SC2086  # a list of module names
    module load $MEGATRAIN_MODULES
fi
if [[ -n ${MEGATRAIN_VENV:-} ]]; then
    source "$MEGATRAIN_VENV/bin/activate"  # a wrong path stops the job here (set -e)
elif [[ -f $MEGATRAIN_HOME/.venv/bin/activate ]]; then
    source "$MEGATRAIN_HOME/.venv/bin/activate"
fi
export MEGATRAIN_HOME PYTHONPATH=$MEGATRAIN_HOME${PYTHONPATH:+:$PYTHONPATH}
