# Sourced by the CLI tests. Needs $bin (the tool) and $tmp (a scratch dir); sets fail=1 on a mismatch.
# expect STATUS TEXT -- args...: the tool exits with STATUS and its stderr contains TEXT.
expect() {
  local want=$1 text=$2; shift 3
  "$bin" "$@" >"$tmp/out" 2>"$tmp/err"; local rc=$?
  if [ $rc -ne "$want" ] || ! grep -qF -- "$text" "$tmp/err"; then
    echo "FAIL (exit $rc, want $want, want text '$text'): $*"; cat "$tmp/err"; fail=1
  else echo "ok   exit $rc: $(head -1 "$tmp/err" | head -c 160)"; fi
}
