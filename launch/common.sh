# Shell helpers shared by the launchers (sourced, not run): errors, POSIX quoting, and --dry-run printing.
# shellcheck shell=bash

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# q WORD: WORD in single quotes for any POSIX shell (a remote login shell included), ' written as '\''.
q() {
  printf "'%s'" "${1//\'/\'\\\'\'}"
}

# qq WORD: WORD as is when it holds only characters no shell treats specially, else q WORD.
qq() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else q "$1"; fi
}

# show ARG...: prints the command line, each argument quoted so the line can be pasted into a shell.
show() {
  local a out=()
  for a in "$@"; do out+=("$(qq "$a")"); done
  echo "${out[*]}"
}

# run ARG...: runs the command, or only prints it when DRY_RUN=1.
run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then show "$@"; else "$@"; fi
}
