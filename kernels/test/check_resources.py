#!/usr/bin/python3
"""Resource check of the kernel fatbin: no register spills, no local memory, every kernel for every
architecture.

    check_resources.py <lmc_kernels.fatbin> [<ptxas -v log>]

Reads `cuobjdump --list-elf --list-ptx` and `cuobjdump -res-usage` of the fatbin (this works without
a GPU) and, when given, the `nvcc -Xptxas -v` log of the build. Fails when:
  - an architecture of the build (SASS sm_70, sm_75, sm_80, sm_86, sm_89, sm_90 and PTX compute_90)
    is missing, or a kernel of the table is missing for one;
  - any kernel uses a stack frame or local memory (STACK / LOCAL > 0): register spills go there;
  - the ptxas log reports spill stores / loads or a stack frame for any entry function.
Prints one "ok - ..." / "not ok - ..." line per check, a register table, and exits 1 on any failure.
"""
import re
import shutil
import subprocess
import sys

ARCHS = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90"]
KERNELS = [f"lmc_kv_{d}_v{v}" for d in ("gather", "scatter") for v in (16, 8, 4, 2, 1)]

results = []


def check(ok, text):
    results.append(bool(ok))
    print(("ok - " if ok else "not ok - ") + text, flush=True)


def run(args):
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def main(argv):
    if len(argv) not in (2, 3):
        print(__doc__.strip().splitlines()[3].strip(), file=sys.stderr)
        return 2
    fatbin = argv[1]
    cuobjdump = shutil.which("cuobjdump")
    if not cuobjdump:
        check(False, "cuobjdump not found: the CUDA toolkit is needed for the resource check (build.sh installs it)")
        return 1

    listing = run([cuobjdump, "--list-elf", "--list-ptx", fatbin])
    elves = set(re.findall(r"ELF file\s+\d+:\s+\S*\.(sm_\d+)\.cubin", listing))
    ptx = set(re.findall(r"PTX file\s+\d+:\s+\S*\.(sm_\d+)\.ptx", listing))
    check(elves == set(ARCHS), f"SASS for {', '.join(ARCHS)} (found {', '.join(sorted(elves)) or 'none'})")
    check(ptx == {"sm_90"}, f"PTX for compute_90, JIT-compiled on newer GPUs (found {', '.join(sorted(ptx)) or 'none'})")

    usage = run([cuobjdump, "-res-usage", fatbin])
    per_arch = {}
    arch = None
    function = None
    for line in usage.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
            per_arch.setdefault(arch, {})
            continue
        m = re.match(r"\s*Function (\w+):", line)
        if m:
            function = m.group(1)
            continue
        m = re.match(r"\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and arch and function:
            per_arch[arch][function] = tuple(int(x) for x in m.groups())
            function = None
    table = []
    for a in ARCHS:
        kernels = per_arch.get(a, {})
        missing = [k for k in KERNELS if k not in kernels]
        spilling = [f"{k} (STACK {v[1]}, LOCAL {v[3]})" for k, v in kernels.items() if v[1] or v[3]]
        regs = [v[0] for v in kernels.values()]
        check(not missing and not spilling,
              f"{a}: {len(kernels)} kernels, registers {min(regs, default=0)}-{max(regs, default=0)}, no stack frame, no local memory"
              + (f"; missing {missing}" if missing else "") + (f"; SPILLS/LOCAL: {spilling}" if spilling else ""))
        table.append((a, kernels))

    print("# registers per kernel (cuobjdump -res-usage):")
    print("#   " + "kernel".ljust(22) + "".join(a.rjust(7) for a in ARCHS))
    for k in KERNELS:
        print("#   " + k.ljust(22) + "".join(str(dict(table)[a].get(k, ("-",))[0]).rjust(7) for a in ARCHS))

    if len(argv) == 3:
        entries = []
        current = None
        for line in open(argv[2], encoding="utf-8", errors="replace"):
            m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
            if m:
                current = m.groups()
                continue
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and current:
                entries.append(current + m.groups())
                current = None
        bad = [f"{name}@{a}" for name, a, stack, st, ld in entries if int(stack) or int(st) or int(ld)]
        check(len(entries) >= len(KERNELS) * len(ARCHS) and not bad,
              f"ptxas -v: {len(entries)} entry functions compiled, 0 bytes stack frame / spill stores / spill loads"
              + (f"; spills in {bad}" if bad else ""))

    failed = results.count(False)
    print(f"# resources: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except RuntimeError as e:
        check(False, str(e))
        sys.exit(1)
