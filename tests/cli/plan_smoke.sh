#!/usr/bin/env bash
# unshard-plan from the command line: --json gives one JSON document on stdout, exit 0 whether or not
# the plan fits; both schedules, the rendered size and the block time; bad input exits 1 and bad usage
# 2, each with a message naming the culprit.
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
text_ok() {  # text_ok TEXT -- args...: exit 0 and stdout contains TEXT
  local text=$1; shift 2
  if ! "$bin" "$@" >"$tmp/out" 2>"$tmp/err"; then echo "FAIL (exit non-zero): $*"; cat "$tmp/err"; fail=1; return; fi
  if grep -qF -- "$text" "$tmp/out"; then echo "ok   text '$text': $*"; else echo "FAIL (no '$text' in stdout): $*"; fail=1; fi
}
P=(--model liveavatar-14b --world-size 5 --device-memory 24GiB)
WAN=$(dirname "$0")/../data/wan_tiny_a.config.json
json_ok "d['fits'] is False and d['world_size']==5 and len(d['ranks'])==5 and d['peak_bytes']==sum(d['ranks'][0]['terms'].values())" -- "${P[@]}" --policy fsdp
json_ok "d['budget_bytes']==24*2**30-round(1.85*2**30) and d['time_s']>0 and d['schedule']=='steps' and d['steps']==4" -- "${P[@]}" --policy fsdp
# Live Avatar's FSDP failure, each rank one step: within 5 % of the documented 25.65 GiB; rank 4 owns no step.
json_ok "abs(d['peak_bytes']/2**30-25.65)<0.05*25.65 and d['ranks'][4]['terms']['kv_cache']==0 and d['ranks'][4]['cached_steps']==[] and 'why_not' in d" -- "${P[@]}" --policy fsdp --schedule steps
json_ok "d['schedule']=='steps' and d['frames_per_s']>0 and d['block_s']>0 and d['resolution']['rendered']=='704x384' and d['streamed_tokens']==3168 and d['cond_tokens']==2640 and d['fits'] is True" -- "${P[@]}" --policy chunked:64MiB+prefetch:1 --schedule steps --resolution 720x400
json_ok "abs(d['frames_per_s']-12/d['block_s'])<1e-9 and abs(d['block_s']-d['time_s'])<1e-9" -- "${P[@]}" --policy chunked:64MiB+prefetch:1
# replicated, the old behaviour: ranks alike, every step's cache on each, a block is S forwards.
json_ok "d['schedule']=='replicated' and len({r['peak_bytes'] for r in d['ranks']})==1 and d['ranks'][0]['cached_steps']==[0,1,2] and abs(d['block_s']-3*d['time_s'])<1e-9 and d['fits'] is False" -- "${P[@]}" --policy chunked:64MiB+prefetch:1 --schedule replicated --steps 3
json_ok "d['ranks'][0]['terms']['shards']<d['ranks'][0]['host_bytes'] and 'shards.text_encoder' not in d['ranks'][0]['details'] and d['t5']=='host'" -- "${P[@]}" --policy chunked:64MiB+prefetch:1 --t5 host
json_ok "len(d['candidates'])>0 and all(c['fits'] for c in d['candidates']) and [c['block_s'] for c in d['candidates']]==sorted(c['block_s'] for c in d['candidates'])" -- "${P[@]}" --policy auto
json_ok "len(d['candidates'])>0 and {c['schedule'] for c in d['candidates']}=={'replicated'}" -- --model liveavatar-14b --world-size 5 --device-memory 80GiB --policy auto --schedule replicated
# 1 x 24 GiB: the four steps' caches alone (40.69 GiB) are over the budget on the device ...
json_ok "d['fits'] is False and 'the KV cache alone is 40.69 GiB' in d['why_not']" -- --model liveavatar-14b --world-size 1 --device-memory 24GiB --policy fsdp
# ... so auto, which searches fp8 weights and the caches in host memory by default, finds plans that
# stream both from host memory, each reporting the pinned host memory it needs, within 1.3x of compute.
json_ok "len(d['candidates'])>0 and all('kv:offload' in c['policy'] and '+offload+' in c['policy'] and c['host_bytes']>40*2**30 for c in d['candidates']) and d['candidates'][0]['compute_ratio']<=1.3 and abs(d['candidates'][0]['compute_s']-4*1.42988)<0.01" -- --model liveavatar-14b --world-size 1 --device-memory 24GiB --policy auto
json_ok "len(d['candidates'])>0 and d['candidates'][0]['compute_ratio']<=1.3 and abs(d['candidates'][0]['compute_s']-2*1.42988)<0.005 and all(r['compute_s']==d['candidates'][0]['compute_s'] for r in d['candidates'][0]['ranks'])" -- --model liveavatar-14b --world-size 2 --device-memory 24GiB --policy auto
# --host-memory caps what a plan may pin: every candidate within it, or none and the closest says why.
json_ok "len(d['candidates'])>0 and all(r['host_bytes']<=72*2**30 for c in d['candidates'] for r in c['ranks']) and d['candidates'][0]['host_budget_bytes']==72*2**30" -- --model liveavatar-14b --world-size 1 --device-memory 24GiB --policy auto --host-memory 72GiB
json_ok "d['candidates']==[] and '--host-memory' in d['closest']['why_not']" -- --model liveavatar-14b --world-size 2 --device-memory 24GiB --policy auto --host-memory 16GiB
json_ok "len(d['candidates'])>0 and not any('fp8' in c['policy'] for c in d['candidates'])" -- "${P[@]}" --policy auto --no-fp8
json_ok "any('fp8' in c['policy'] for c in d['candidates']) and any('kv:offload' in c['policy'] for c in d['candidates'])" -- "${P[@]}" --policy auto --fp8
# compute_s: the compute-bound seconds of the forwards block_s times; per rank, rank 4 (no step) computes nothing.
json_ok "abs(d['compute_s']-1.42988)<0.001 and abs(d['compute_ratio']-d['block_s']/d['compute_s'])<1e-9 and d['ranks'][4]['compute_s']==0 and d['ranks'][0]['compute_s']==d['compute_s'] and 'transfer-bound' in d['time_note'] and d['transfers_s']['all_gather']>d['compute_s']" -- "${P[@]}" --policy fsdp
json_ok "'time_note' not in d and d['compute_ratio']<=1.3 and d['transfers_s']['kv_in']==0" -- "${P[@]}" --policy full+fp8
json_ok "d['kv_prefetch']==2 and d['transfers_s']['kv_in']>0 and d['transfers_s']['kv_out']>0 and d['host_bytes']==d['ranks'][0]['host_bytes']" -- "${P[@]}" --policy prefetch:1+kv:offload:2
text_ok "s per block against 1.430 s compute-bound (1.55x)" -- "${P[@]}" --policy fsdp
text_ok "1.55x compute-bound, above the 1.3x goal: transfer-bound" -- "${P[@]}" --policy fsdp
text_ok "x compute" -- "${P[@]}" --policy auto
json_ok "d['effective_chunk_bytes']>0" -- "${P[@]}" --policy chunked:64MiB+prefetch:1
json_ok "d['fits'] is True" -- --model liveavatar-14b --world-size 5 --device-memory 80GiB --policy fsdp --resolution 704x384
json_ok "d['resolution']['rendered']=='704x384'" -- "${P[@]}" --resolution 721x400
json_ok "d['cond_tokens']==0 and d['ranks'][0]['terms']['kv_cache']==0" -- --model "$WAN" --world-size 2 --device-memory 1GiB --reserve 0B --resolution 64x64
# A Live Avatar (S2V) config plans its own S2V DiT (audio, cond tokens, KV caches), not Wan's defaults.
S2V=$(dirname "$0")/../data/liveavatar_tiny_a.config.json
json_ok "d['cond_tokens']==2640 and d['ranks'][0]['terms']['kv_cache']>0 and d['model'].endswith('liveavatar_tiny_a.config.json')" -- --model "$S2V" --world-size 2 --device-memory 24GiB
expect 1 "--world-size: world size must be at least 1 (got 0)" -- --model liveavatar-14b --world-size 0 --device-memory 24GiB
expect 1 "--steps must be at least 1 (got 0)" -- "${P[@]}" --steps 0
expect 1 "puts more than 64 steps on one rank" -- "${P[@]}" --steps 1000
expect 1 "--steps 1001 is above the 1000 denoising steps planned" -- "${P[@]}" --steps 1001
expect 1 "--world-size: world size 1025 is beyond the supported 1024" -- --model liveavatar-14b --world-size 1025 --device-memory 24GiB
expect 1 "is not above the reserve" -- --model liveavatar-14b --world-size 5 --device-memory 1GiB
expect 1 "unknown model 'liveavatar-1b'" -- --model liveavatar-1b --world-size 5 --device-memory 24GiB
expect 1 "resolution 10x10 renders at 0x0" -- "${P[@]}" --resolution 10x10
expect 1 "resolution -720x400 must be positive" -- "${P[@]}" --resolution -720x400
expect 1 "has a side above 16384 pixels" -- "${P[@]}" --resolution 99999999999x400
expect 1 "resolution 721x400 is not divisible by 16" -- --model "$WAN" --world-size 2 --device-memory 24GiB --resolution 721x400
expect 2 "unknown schedule 'pipeline' (expected steps or replicated)" -- "${P[@]}" --schedule pipeline
expect 2 "unknown umT5 placement 'gpu' (expected device or host)" -- "${P[@]}" --t5 gpu
expect 2 "option --steps needs a non-negative integer, got 'four'" -- "${P[@]}" --steps four
expect 2 "unknown term 'warp'" -- "${P[@]}" --policy warp
expect 2 "unknown option '--bogus'" -- "${P[@]}" --bogus
expect 2 "--fp8 and --no-fp8 contradict each other" -- "${P[@]}" --policy auto --fp8 --no-fp8
expect 2 "missing required option --device-memory" -- --model liveavatar-14b --world-size 5
expect 2 "invalid --device-memory '24XB'" -- --model liveavatar-14b --world-size 5 --device-memory 24XB
exit $fail
