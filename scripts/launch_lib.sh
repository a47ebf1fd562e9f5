# Helpers sourced by launch_tpu.sh and launch_slurm.sh (not run by itself).
# They only print quoted text, so nothing of this is needed on the workers.

# The calling script's leading comment block, without the '#' marks.
usage() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
  exit "${1:-2}"
}
die() { echo "${0##*/}: $*" >&2; exit 2; }

# Shell-quotes one word only where needed (readable, and exact for bash).
q() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then
    printf '%s' "$1"
  elif [[ "$1" != *\'* ]]; then
    printf "'%s'" "$1"
  elif [[ "$1" != *[\"\$\`\\!]* ]]; then
    printf '"%s"' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
# Words joined for bash; --name=value words keep --name= outside the quotes.
join_quoted() {
  local out='' w
  for w in "$@"; do
    if [[ "$w" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
      out+="${out:+ }${BASH_REMATCH[1]}$(q "${BASH_REMATCH[2]}")"
    else
      out+="${out:+ }$(q "$w")"
    fi
  done
  printf '%s' "$out"
}
