#!/usr/bin/env bash
# The browser tests (tests/test_studio_browser.py) drive Debian's headless Chromium through its
# chromedriver. Exits 0 when both are on PATH; otherwise installs them with apt-get (as root, or
# through `sudo -n`), and exits 1 with a message saying what to do when it cannot.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi

packages=(chromium chromium-driver)
if [ "$(id -u)" -eq 0 ]; then
    run=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    run=(sudo -n)
else
    echo "tests/install_browser.sh: chromium and chromedriver are not on PATH, and this user cannot install" >&2
    echo "them (not root, no password-less sudo). Install them, then run the tests again:" >&2
    echo "    sudo apt-get install --no-install-recommends ${packages[*]}" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "tests/install_browser.sh: no apt-get here; install Chromium and a matching chromedriver" >&2
    echo "so that \`chromium\` and \`chromedriver\` are on PATH, then run the tests again." >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# ${run[@]+...}: an empty array under `set -u` (bash < 4.4 calls it unbound)
if ! { ${run[@]+"${run[@]}"} apt-get update && ${run[@]+"${run[@]}"} apt-get install -y --no-install-recommends "${packages[@]}"; }; then
    echo "tests/install_browser.sh: apt-get could not install ${packages[*]} (see above)." >&2
    exit 1
fi

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    echo "tests/install_browser.sh: installed ${packages[*]}, but chromium or chromedriver is still not on PATH." >&2
    exit 1
fi
