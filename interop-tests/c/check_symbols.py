#!/usr/bin/python3
"""Symbol parity between include/lmcache_native.h and the published liblmcache_native.so.

    check_symbols.py <path-to-.so> [<path-to-header>]

Every function the header declares with LMC_API must be exported by the library, and every `lmc_`
function the library exports must be declared in the header. Exports come from
`nm -D --defined-only` (type T; NativeAOT adds the symbol version `@@V1.0`, which is stripped).
Declarations come from a regex over the header with comments and preprocessor lines removed; when
clang-14 is on PATH its AST dump is used as a second, independent parse and the two must agree.

Prints one "ok - ..." / "not ok - ..." line per check; exits 1 when any check failed.
"""
import json
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_HEADER = os.path.normpath(os.path.join(HERE, "..", "..", "include", "lmcache_native.h"))

results = []


def check(ok, text):
    results.append(bool(ok))
    print(("ok - " if ok else "not ok - ") + text, flush=True)


def strip_comments_and_directives(text):
    """Removes /* */ and // comments (keeping string literals intact) and preprocessor lines."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
            out.append(" ")
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text[i] == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        else:
            out.append(text[i])
            i += 1
    code = "".join(out)
    code = re.sub(r"\\\n", " ", code)  # join continued lines before dropping directives
    return "\n".join(line for line in code.splitlines() if not line.lstrip().startswith("#"))


# LMC_API <return type> <name>(<params>);  -- the name is the identifier right before "(".
DECL_RE = re.compile(r"\bLMC_API\b(?P<ret>[^;(){}]*?)\b(?P<name>[A-Za-z_]\w*)\s*\((?P<params>[^;{}]*?)\)\s*;")


def header_functions_regex(header_path):
    code = strip_comments_and_directives(open(header_path, encoding="utf-8").read())
    names = [m.group("name") for m in DECL_RE.finditer(code)]
    api_uses = len(re.findall(r"\bLMC_API\b", code))
    return names, api_uses


def header_functions_clang(header_path, clang):
    """FunctionDecls of the header itself, from clang's JSON AST. None when clang fails."""
    try:
        proc = subprocess.run(
            [clang, "-x", "c", "-std=c99", "-fsyntax-only", "-Xclang", "-ast-dump=json", header_path],
            capture_output=True, text=True, timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    names = []
    current_file = None
    for node in json.loads(proc.stdout).get("inner", []):
        # clang only records "file" when it changes from the previous node.
        loc = node.get("loc", {})
        current_file = loc.get("file", current_file)
        if node.get("kind") == "FunctionDecl" and not node.get("isImplicit"):
            if current_file and os.path.realpath(current_file) == os.path.realpath(header_path):
                names.append(node["name"])
    return names


def exported_symbols(so_path):
    """(functions, others): lmc_ names of type T, and other lmc_ exports as (name, type)."""
    proc = subprocess.run(["nm", "-D", "--defined-only", so_path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("nm failed: " + proc.stderr.strip())
    functions, others = [], []
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        sym_type, name = parts[-2], parts[-1].split("@")[0]
        if not name.startswith("lmc_"):
            continue
        (functions if sym_type == "T" else others).append((name, sym_type))
    return [n for n, _ in functions], others


def main(argv):
    if len(argv) < 2 or len(argv) > 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    so_path = argv[1]
    header_path = argv[2] if len(argv) == 3 else DEFAULT_HEADER

    declared, api_uses = header_functions_regex(header_path)
    check(len(declared) > 0 and len(declared) == api_uses,
          f"header: {len(declared)} LMC_API declarations parsed out of {api_uses} uses of LMC_API")
    check(len(set(declared)) == len(declared), "header: no function declared twice")
    check(all(n.startswith("lmc_") for n in declared),
          "header: every function has the lmc_ prefix"
          + "".join(f" [{n}]" for n in declared if not n.startswith("lmc_")))

    clang = shutil.which("clang-14") or shutil.which("clang")
    if clang:
        parsed = header_functions_clang(header_path, clang)
        if parsed is None:
            check(False, f"header: {os.path.basename(clang)} could not parse the header")
        else:
            check(sorted(parsed) == sorted(declared),
                  f"header: {os.path.basename(clang)} AST lists the same {len(parsed)} functions as the regex"
                  + ("" if sorted(parsed) == sorted(declared)
                     else f" (clang only: {sorted(set(parsed) - set(declared))}, "
                          f"regex only: {sorted(set(declared) - set(parsed))})"))
    else:
        print("# clang not found: the regex parse is not cross-checked")

    try:
        exported, others = exported_symbols(so_path)
    except (OSError, RuntimeError) as e:
        check(False, f"nm -D --defined-only {so_path}: {e}")
        return 1

    for name in sorted(set(declared)):
        check(name in exported, f"{name}: declared in the header and exported" if name in exported
              else f"{name}: declared in the header but NOT exported by the library")
    for name in sorted(set(exported) - set(declared)):
        check(False, f"{name}: exported by the library but NOT declared in the header")
    for name, sym_type in others:
        check(False, f"{name}: exported as a non-function symbol (type {sym_type})")

    failed = results.count(False)
    print(f"# symbols: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
