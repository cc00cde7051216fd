#!/usr/bin/env bash
# unshard-plan from the command line: --json gives one JSON document on stdout, exit 0 whether or not
# the plan fits; bad input exits 1 and bad usage 2, each with a message naming the culprit.
# Usage: plan_smoke.sh BIN_DIR
set -u
bin=$1/unshard-plan; tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT; fail=0
. "$(dirname "$0")/expect.sh"
json_ok() {  # json_ok PYTHON_CHECK -- args...: exit 0 and stdout one JSON document passing the check
  local check=$1; shift 2
  if ! "$bin" "$@" --json >"$tmp/out" 2>"$tmp/err"; then echo "FAIL (exit non-zero): $*"; cat "$tmp/err"; fail=1; return; fi
  if python3 -c "import json,sys; d=json.load(open('$tmp/out')); assert $check, d" 2>"$tmp/py"; then echo "ok   json: $*"
  else echo "FAIL (json check '$check'): $*"; tail -2 "$tmp/py"; fail=1; fi
}
P=(--model liveavatar-14b --world-size 5 --device-memory 24GiB)
json_ok "d['fits'] is False and d['world_size']==5 and len(d['ranks'])==5 and d['peak_bytes']==sum(d['ranks'][0]['terms'].values())" -- "${P[@]}" --policy fsdp
json_ok "d['budget_bytes']==24*2**30-round(1.85*2**30) and d['time_s']>0" -- "${P[@]}" --policy fsdp
json_ok "len(d['candidates'])>0 and all(c['fits'] for c in d['candidates']) and [c['time_s'] for c in d['candidates']]==sorted(c['time_s'] for c in d['candidates'])" -- "${P[@]}" --policy auto
json_ok "d['effective_chunk_bytes']>0" -- "${P[@]}" --policy chunked:64MiB+prefetch:1
json_ok "d['fits'] is True" -- --model liveavatar-14b --world-size 5 --device-memory 80GiB --policy fsdp --resolution 704x384
expect 1 "--world-size must be at least 1 (got 0)" -- --model liveavatar-14b --world-size 0 --device-memory 24GiB
expect 1 "is not above the reserve" -- --model liveavatar-14b --world-size 5 --device-memory 1GiB
expect 1 "unknown model 'liveavatar-1b'" -- --model liveavatar-1b --world-size 5 --device-memory 24GiB
expect 1 "resolution 721x400 is not divisible by 16" -- "${P[@]}" --resolution 721x400
expect 2 "unknown term 'warp'" -- "${P[@]}" --policy warp
expect 2 "unknown option '--bogus'" -- "${P[@]}" --bogus
expect 2 "missing required option --device-memory" -- --model liveavatar-14b --world-size 5
expect 2 "invalid --device-memory '24XB'" -- --model liveavatar-14b --world-size 5 --device-memory 24XB
exit $fail
