#!/usr/bin/env bash
# unshard-plan --timeline, --profiles and the chunked policy from the command line: the timeline is
# Chrome trace JSON (one tick under the steps schedule) whose memory curve peaks at each rank's planned
# peak; a user profiles file adds a device; bad profiles exit 1, unknown profile names 2.
# Usage: plan_timeline.sh BIN_DIR
set -u
bin=$1/unshard-plan; tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT; fail=0
. "$(dirname "$0")/expect.sh"
P=(--model liveavatar-14b --world-size 5 --device-memory 24GiB)
check() {  # check DESCRIPTION PYTHON -- args: exit 0, then the python check over $tmp passes
  local what=$1 py=$2; shift 3
  if ! "$bin" "$@" >"$tmp/out" 2>"$tmp/err"; then echo "FAIL (exit non-zero): $what"; cat "$tmp/err"; fail=1; return; fi
  if python3 -c "$py" "$tmp" 2>"$tmp/py"; then echo "ok   $what"; else echo "FAIL: $what"; tail -3 "$tmp/py"; fail=1; fi
}
peak_matches='
import json,sys; d=sys.argv[1]
plan=json.load(open(d+"/out")); tl=json.load(open(d+"/tl.json"))["traceEvents"]
for r in plan["ranks"]:  # each rank: its own constant terms under the steps schedule
  tot=max(sum(e["args"].values()) for e in tl if e["ph"]=="C" and e["pid"]==r["rank"])
  assert tot==r["peak_bytes"], (r["rank"], tot, r["peak_bytes"])
assert max(r["peak_bytes"] for r in plan["ranks"])==plan["peak_bytes"]
assert {e["pid"] for e in tl}==set(range(plan["world_size"]))
assert any(e["ph"]=="X" and e["name"].startswith("gather") for e in tl)'
check "fsdp timeline peaks at the planned peak" "$peak_matches" -- "${P[@]}" --policy fsdp --json --timeline "$tmp/tl.json"
check "chunked timeline peaks at the planned peak" "$peak_matches" -- "${P[@]}" --policy chunked:64MiB+prefetch:1 --json --timeline "$tmp/tl.json"
check "replicated timeline peaks at the planned peak" "$peak_matches" -- "${P[@]}" --policy chunked:64MiB+prefetch:1 --schedule replicated --json --timeline "$tmp/tl.json"
check "a steps tick (two forwards per gather) lasts block_s" '
import json,sys; d=sys.argv[1]
plan=json.load(open(d+"/out")); tl=json.load(open(d+"/tl.json"))["traceEvents"]
end=max(e["ts"]+e["dur"] for e in tl if e["ph"]=="X" and e["pid"]==0)/1e6
assert abs(end-plan["block_s"])<1e-6*plan["block_s"] and plan["block_s"]>plan["time_s"], (end, plan["block_s"])' -- --model liveavatar-14b --world-size 2 --device-memory 80GiB --policy chunked:64MiB+prefetch:1 --json --timeline "$tmp/tl.json"
check "kv:offload: page copies and write-backs on the communication thread; the tick lasts block_s; within the plan" '
import json,sys; d=sys.argv[1]
plan=json.load(open(d+"/out")); tl=json.load(open(d+"/tl.json"))["traceEvents"]
ins=[e for e in tl if e["ph"]=="X" and e["pid"]==0 and e["name"].startswith("kv in ")]
outs=[e for e in tl if e["ph"]=="X" and e["pid"]==0 and e["name"].startswith("kv out ")]
assert len(ins)==40 and len(outs)==40 and all(e["tid"]==1 for e in ins+outs), (len(ins), len(outs))
end=max(e["ts"]+e["dur"] for e in tl if e["ph"]=="X" and e["pid"]==0)/1e6
assert abs(end-plan["block_s"])<1e-6*plan["block_s"], (end, plan["block_s"])
for r in plan["ranks"]:  # the device slots are the kv_cache term; sub-unit pieces never fill the whole ring
  cs=[e["args"] for e in tl if e["ph"]=="C" and e["pid"]==r["rank"]]
  assert max(sum(a.values()) for a in cs)<=r["peak_bytes"] and all(a["kv_cache"]==r["terms"]["kv_cache"] for a in cs), r["rank"]' -- --model liveavatar-14b --world-size 2 --device-memory 24GiB --policy selective:subunit+prefetch:2+fp8+kv:offload --json --timeline "$tmp/tl.json"
check "chunked: effective chunk and (K+1) chunks gathered" '
import json,sys; d=json.load(open(sys.argv[1]+"/out"))
assert d["effective_chunk_bytes"]==64*2**20 and d["ranks"][0]["terms"]["gathered"]==3*64*2**20, d' -- "${P[@]}" --policy chunked:64MiB+prefetch:2 --json
check "chunked smaller than a row: one row" '
import json,sys; d=json.load(open(sys.argv[1]+"/out"))
assert d["effective_chunk_bytes"]==13824*2, d' -- "${P[@]}" --policy chunked:1KiB+prefetch:1 --json
cat >"$tmp/mine.json" <<'J'
{"devices": [{"name": "l40s", "sustained_flops": 180e12, "h2d_bytes_s": 25e9, "link": "pcie4-p2p"}],
 "links": [{"name": "pcie4-p2p", "bus_bytes_s": 20e9, "latency_s": 30e-6}]}
J
check "a user profiles file adds a device" '
import json,sys; d=json.load(open(sys.argv[1]+"/out"))
assert d["device_profile"]=="l40s" and d["link_profile"]=="pcie4-p2p" and "mine.json" in d["profiles"], d' -- "${P[@]}" --profiles "$tmp/mine.json" --device-profile l40s --json
echo '{"links": [{"name": "x", "bus_bytes_s": 0, "latency_s": 0}]}' >"$tmp/bad.json"
expect 1 "bad.json': links[0] ('x'): \"bus_bytes_s\" is 0, must be > 0" -- "${P[@]}" --profiles "$tmp/bad.json"
expect 1 "cannot open profiles file" -- "${P[@]}" --profiles "$tmp/none.json"
expect 2 "unknown device profile 'rtx9090'" -- "${P[@]}" --device-profile rtx9090
expect 2 "unknown link profile 'carrier-pigeon'" -- "${P[@]}" --link-profile carrier-pigeon
expect 2 "--timeline draws one policy" -- "${P[@]}" --policy auto --timeline "$tmp/x.json"
expect 1 "--timeline: cannot create" -- "${P[@]}" --policy fsdp --timeline "$tmp/no/such/dir/x.json"
exit $fail
