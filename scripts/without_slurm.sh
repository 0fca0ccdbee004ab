#!/usr/bin/env bash
# Run a command as on a machine without SLURM, even where SLURM is installed: in a private mount namespace, every
# SLURM and MUNGE command found on PATH (or in the usual sbin folders) is covered by an empty, non-executable file,
# so `shutil.which`, `command -v` and submitit find none of them. Nothing outside the command sees a change.
#
#   bash scripts/without_slurm.sh python -m pytest -q
#
# Needs root (or a user namespace) for `unshare -m`; where nothing is installed the command simply runs.
set -euo pipefail

names=(sbatch srun squeue scontrol sinfo scancel sacct salloc sattach sstat slurmctld slurmd slurmdbd munged munge)
dirs=()
IFS=: read -r -a dirs <<<"${PATH}:/usr/sbin:/sbin:/usr/local/sbin"
found=()
for name in "${names[@]}"; do
  for dir in "${dirs[@]}"; do
    [ -n "$dir" ] && [ -e "$dir/$name" ] && found+=("$(readlink -f "$dir/$name")")
  done
done

if [ "${#found[@]}" -eq 0 ]; then
  exec "$@"
fi
if ! command -v unshare >/dev/null 2>&1; then
  echo "without_slurm.sh: SLURM is installed here and unshare (util-linux) is missing: cannot hide ${found[*]}" >&2
  exit 2
fi

# In the new namespace: bind an empty file over each command, check none is left executable, then run the command.
exec unshare --mount --propagation private bash -euo pipefail -c '
  empty=$(mktemp)
  chmod 0644 "$empty"
  for path in $(printf "%s\n" "${@:2:$1}" | sort -u); do
    mount --bind "$empty" "$path"
  done
  for path in "${@:2:$1}"; do
    if [ -x "$path" ]; then echo "without_slurm.sh: $path is still executable" >&2; exit 2; fi
  done
  shift "$(($1 + 1))"
  exec "$@"
' without_slurm "${#found[@]}" "${found[@]}" "$@"
