#!/usr/bin/env bash
# Every tool answers --help (and -h) with its usage on stdout and exit 0; unshard-plan --policy auto
# stays readable: at most 60 lines, every candidate only with --verbose. Usage: help.sh BIN_DIR
set -u
bin=$1; fail=0
for tool in unshard-dit unshard-avatar unshard-plan unshard-launch; do
  for flag in --help -h; do
    out=$("$bin/$tool" $flag 2>/dev/null); rc=$?
    if [ $rc -ne 0 ] || ! grep -q "^usage: $tool" <<<"$out"; then echo "FAIL $tool $flag: exit $rc"; fail=1
    else echo "ok   $tool $flag: exit 0, $(wc -l <<<"$out") lines of usage"; fi
  done
done
P=(--model liveavatar-14b --world-size 5 --device-memory 24GiB --policy auto)
n=$("$bin/unshard-plan" "${P[@]}" 2>&1 | wc -l)
v=$("$bin/unshard-plan" "${P[@]}" --verbose 2>&1 | wc -l)
if [ "$n" -le 60 ] && [ "$v" -gt "$n" ]; then echo "ok   unshard-plan --policy auto: $n lines ($v with --verbose)"
else echo "FAIL unshard-plan --policy auto: $n lines (at most 60), $v with --verbose"; fail=1; fi
"$bin/unshard-plan" "${P[@]}" | grep -q "configurations fit, fastest first" || { echo "FAIL: no candidate table"; fail=1; }
exit $fail
