# Shared by the tuning scripts (sourced). Every script is dry-run by default:
# it prints what it would change and changes nothing. With --apply it makes
# the change; run twice, the second run finds nothing to do (idempotent).
#   --apply        make the changes (as root)
#   --root DIR     write configuration files under DIR instead of / and skip
#                  live kernel changes (for review, packaging and the tests)
set -euo pipefail

APPLY=0
ROOT=""
CHANGES=0
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --apply) APPLY=1 ;;
    --root) ROOT="${2:?--root needs a directory}"; shift ;;
    --root=*) ROOT="${1#--root=}" ;;
    -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
set -- "${ARGS[@]+"${ARGS[@]}"}"
# Live kernel settings (sysfs, /proc, sysctl) only on the real root.
LIVE=$([ -z "$ROOT" ] && echo 1 || echo 0)

say() { printf '[%s] %s\n' "$(basename "$0" .sh)" "$*"; }

# ensure_file PATH CONTENT: the file holds exactly CONTENT.
ensure_file() {
  local path="$ROOT$1" content="$2"
  if [ -f "$path" ] && [ "$(cat "$path")" = "$content" ]; then
    say "ok: $1 is up to date"
    return 1
  fi
  CHANGES=$((CHANGES + 1))
  if [ "$APPLY" = 1 ]; then
    mkdir -p "$(dirname "$path")"
    printf '%s\n' "$content" >"$path"
    say "wrote $1"
  else
    say "would write $1:"
    printf '%s\n' "$content" | sed 's/^/    /'
  fi
  return 0
}

# ensure_value PATH VALUE: a live kernel file (sysfs/proc) reads VALUE.
# Files that show the choice in brackets ("always [madvise] never") count as
# set when VALUE is the bracketed one.
ensure_value() {
  local path="$1" want="$2" have
  if [ "$LIVE" != 1 ]; then
    say "skip (--root): $path = $want"
    return 0
  fi
  if [ ! -e "$path" ]; then
    say "skip: $path does not exist on this machine"
    return 0
  fi
  have=$(cat "$path")
  if [ "$have" = "$want" ] || printf '%s' "$have" | grep -q "\[$want\]"; then
    say "ok: $path = $want"
    return 0
  fi
  CHANGES=$((CHANGES + 1))
  if [ "$APPLY" = 1 ]; then
    if printf '%s\n' "$want" >"$path" 2>/dev/null; then
      say "set $path: $have -> $want"
    else
      say "could not set $path (read-only here, e.g. in a container)"
    fi
  else
    say "would set $path: $have -> $want"
  fi
}

finish() {
  if [ "$CHANGES" = 0 ]; then
    say "nothing to change"
  elif [ "$APPLY" = 0 ]; then
    say "dry run: $CHANGES change(s) listed above; run with --apply to make them"
  else
    say "$CHANGES change(s) made"
  fi
}
