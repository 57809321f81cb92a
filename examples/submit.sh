#!/bin/sh
# submit.sh - run one occamy request from a shell script with occamyctl(1)
# and act on the outcome by its exit status (sysexits, see occamyctl(1)).
#
#   examples/submit.sh [-c occamy.ini] HANDLER FILE
set -u
conf=/etc/occamy/occamy.ini
if [ "${1:-}" = -c ]; then
	conf=$2
	shift 2
fi
[ $# -eq 2 ] || { echo "usage: $0 [-c occamy.ini] HANDLER FILE" >&2; exit 64; }
ctl=${OCCAMYCTL:-occamyctl}

result=$("$ctl" -c "$conf" -t 30 submit "$1" "$2")
status=$?
case $status in
0) printf 'result: %s\n' "$result" ;;
65) printf 'invalid request, not retried: %s\n' "$result" >&2 ;;
69) printf 'no daemon knows handler %s (or no broker)\n' "$1" >&2 ;;
70) printf 'failed on every attempt: %s\n' "$result" >&2 ;;
75) printf 'no answer in time; it may still run\n' >&2 ;;
*) printf 'occamyctl failed (%d)\n' "$status" >&2 ;;
esac
exit $status
