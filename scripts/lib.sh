# Shared by scripts/setup and scripts/install (sourced, not run).

# apt_install_missing NAME PACKAGE...: installs, from Debian, those of PACKAGE...
# that are not installed yet (nothing at all if none is missing), with sudo unless
# root. NAME prefixes the one line it prints.
apt_install_missing() {
    local name=$1 package sudo=""
    shift
    local missing=()
    for package in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$package")
        fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        echo "$name: installing ${missing[*]}" >&2
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}
