# Sourced by the cluster setup scripts.

# install_packages PKG...: installs the Debian packages that are missing, quietly.
install_packages() {
    dpkg -s "$@" >/dev/null 2>&1 && return
    echo "installing $*" >&2
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine may have no package lists yet; update only when the install needs it.
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 || {
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    }
}
