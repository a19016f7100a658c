# Sourced by scripts/test: make sure a headless Chromium is present for the status-page browser
# test. CI runs as root on Debian/Ubuntu, so it installs the OS package `chromium` quietly; where
# that is impossible the test itself fails with the reason (it never skips silently).
if [ -z "${TILERUN_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 \
  && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[tilerun] installing chromium (apt) for the status-page browser test" >&2
    export DEBIAN_FRONTEND=noninteractive
    # The lock timeout lets a concurrent apt run finish instead of failing at once.
    { apt-get -o DPkg::Lock::Timeout=300 update -qq \
        && apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends chromium; } \
      >/tmp/tilerun-apt-chromium.log 2>&1 \
      || echo "[tilerun] chromium install failed (see /tmp/tilerun-apt-chromium.log)" >&2
  fi
fi
