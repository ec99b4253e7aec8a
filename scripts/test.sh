#!/usr/bin/env bash
# Installs everything the test suite needs, then runs all of it. Extra arguments go to pytest.
#   - this project with its test extras, into the current Python
#   - system packages: libkrb5-dev (sparkmagic's Kerberos dependencies compile against it),
#     chromium (the browser test drives Debian's build through Playwright; never `playwright install`),
#     git and openssl (workspace clones from a test HTTPS git server with its own certificate)
#   - a separate virtualenv with sparkmagic, whose own kernel the tests drive (it caps pandas
#     below 3 and pulls in Kerberos, so it never becomes a dependency of ours)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

missing=()
for package in libkrb5-dev chromium git openssl; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing system packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

"$PYTHON" -m pip install -q -e '.[test]'

SPARKMAGIC_VENV="${STUDIO_SPARKMAGIC_VENV:-.venv-sparkmagic}"
if ! "$SPARKMAGIC_VENV/bin/python" -c "import sparkmagic, nbclient" >/dev/null 2>&1; then
    echo "creating sparkmagic's virtualenv in $SPARKMAGIC_VENV (compiles Kerberos bindings; takes a few minutes)"
    "$PYTHON" -m venv "$SPARKMAGIC_VENV"
    "$SPARKMAGIC_VENV/bin/pip" install -q 'sparkmagic==0.23.0' nbclient
fi
if ! "$SPARKMAGIC_VENV/bin/jupyter" kernelspec list 2>/dev/null | grep -q pysparkkernel; then
    site="$("$SPARKMAGIC_VENV/bin/python" -c 'import os, sparkmagic; print(os.path.dirname(sparkmagic.__file__))')"
    "$SPARKMAGIC_VENV/bin/jupyter" kernelspec install "$site/kernels/pysparkkernel" --sys-prefix >/dev/null
fi
export STUDIO_SPARKMAGIC_PYTHON="$(cd "$SPARKMAGIC_VENV" && pwd)/bin/python"  # relative or absolute

# Two test processes, a module each at a time (STUDIO_TEST_PROCESSES=0: all in this process, one after another).
# tests/conftest.py deals the heaviest modules out first, so that both processes end at about the same time.
# pytest-benchmark, where some machine has it, refuses to run beside xdist with a warning, which
# this suite turns into an error; the suite has no benchmarks (studio bench measures), so it is off.
exec "$PYTHON" -m pytest -n "${STUDIO_TEST_PROCESSES:-2}" --dist loadfile -p no:benchmark "$@"
