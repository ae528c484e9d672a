#!/bin/sh
# Warn when the venv's interpreter cannot be run by other users: a venv's
# python is a symlink to the interpreter it was made from, and a pyenv
# under /root (mode 700) makes `.venv/bin/nrm` root's alone. Never fails:
# a single-user checkout is fine, it only must not be mistaken for an
# install for everyone (docs/install.md describes one).
py=${1:?usage: check-shared-python.sh VENV_PYTHON}
real=$(readlink -f "$py")

blocked=""
# others need x on every directory on the way to the interpreter (and its
# stdlib, which lives under the same prefix)
d=$real
while [ "$d" != "/" ]; do
    d=$(dirname "$d")
    case $(stat -c %A "$d") in
        ?????????[xt]) ;;
        *) blocked="$d is not searchable by other users"; break ;;
    esac
done
if [ -z "$blocked" ] && [ "$(id -u)" -eq 0 ] && command -v setpriv >/dev/null 2>&1; then
    setpriv --reuid=65534 --regid=65534 --clear-groups "$py" -c pass >/dev/null 2>&1 \
        || blocked="user nobody cannot run it"
fi
[ -z "$blocked" ] && exit 0
cat >&2 <<MSG
warning: $py is $real, which other users cannot run
         ($blocked): nrm in this venv works for $(id -un) only.
         To install nrm for every user of the node, see docs/install.md
         (a python every user can run, and a shared prefix).
MSG
exit 0
