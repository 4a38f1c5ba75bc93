"""Every shell command in README.md and docs/*.md runs, by one rule: the ```bash blocks, and
the inline `code` that starts with a command (`python -m tools.search --help`).

The rule (nothing below depends on the exact text of a command):
1. Each ```bash block runs under `bash -e` in a sandbox: a temporary folder linking the
   repository's top-level files, whose PATH holds a few coreutils and stand-ins. `python`,
   `python3`, `torchrun` and `pip` RECORD their arguments instead of running; `srun` runs its
   command; `make` runs as `make -n` (prints the recipe). So the shell wrappers really run:
   run.sh's `--list-presets` and `--dry-run`, their variables and their checks. Any other
   program is missing from PATH, so the block fails.
2. Every recorded call, and every `python`/`torchrun` line a command prints (a --dry-run, a
   make -n recipe),
   is resolved to its entry point: a script path that moved or a module that does not exist
   fails. `python path/x.py` inside a package is the module `path.x` (= `python -m path.x`).
3. The entry point runs in this process as `__main__`, stopped right after its argparse
   parser parsed the arguments: an unknown flag or a bad choice fails, `--help` prints the
   help for real. Flags an entry point forwards (FORWARDS) are parsed by their receiver.
4. A recorded call that does more than that (no --help) either really runs on a tiny fixture
   (RUN_ON_FIXTURES: the flags naming data are pointed at the fixture) or must have its entry
   point in NOT_RUN with the reason it is not run here. Entries no command uses fail.
Placeholders: a lone `...` stands for more flags (the parser then takes a missing required flag
as given), `[--flag value]` (optional) is kept without its brackets, and every `ckpts/...` path
a command names exists in the sandbox (a file when its name has a dot, else a folder).
Inline code is read as usage notation: a bare mention (`python -m tools.search`, `bash run.sh`)
runs its --help, `a|b` is `a`, `DIR...` is `DIR`, `<x>` is `x`, and an
optional repeat `[--run ...]` is left out. Code blocks not labelled bash must not start with a
command (test below), so none escapes.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

from tests.test_docs import ROOT, markdown_pages

# Entry points a documented command calls that are not run here, with the reason. Their
# flags are still parsed (rule 3); tests/ run the code itself on tiny fixtures.
NOT_RUN = {
    "main_task_retrieval": "trains or evaluates a model: hours on GPUs over a real dataset",
    "preprocess.prepare_data": "downloads a dataset (network, gigabytes)",
    "preprocess.compress_video": "re-encodes every video of a dataset (ffmpeg, hours)",
    "preprocess.extract_audio": "extracts the audio of every video of a dataset (ffmpeg, hours)",
    "preprocess.cache_audio_features": "runs the AST over every clip of a dataset (GPU hours)",
    "preprocess.cache_frames": "decodes every video of a dataset (hours)",
    "preprocess.make_val_split": "reads MSR-VTT's real annotation files (data/msrvtt)",
    "tools.audit_protocol": "evaluates a trained checkpoint four or five times",
    "tools.robustness_table": "reads the evaluations the loop before it writes (demo_out, minutes)",
    "tools.probe_sound": "reads the checkpoint and data `make demo` writes (minutes)",
    "tools.search": "needs a trained checkpoint and a folder of your own clips",
    "synthetic.category_audio_cache": "reads the AST cache `make demo` writes (minutes)",
    "synthetic.make_synthetic_av": "renders the synthetic benchmark's 2,000-odd clips (minutes)",
    "synthetic.demo": "trains and evaluates every row of the synthetic benchmark (CPU hours)",
    "bench.text_guidance": "trains 12 rows x 3 seeds of the synthetic benchmark (CPU hours)",
    "bench.score_bench": "a timing benchmark (minutes; timings never go in tests)",
    "bench.decode_bench": "a timing benchmark over generated videos (minutes)",
    "bench.metric_conventions": "sweeps random score matrices (6 CPU-seconds at --videos 20, more by default)",
    "tools.pair_memory": "measures training memory (GPU); --table reads those measurements",
    "tools.gpu_check": "needs a CUDA GPU; its --device cpu --tiny run is tests/test_benches.py's (tens of seconds)",
    "python -c": "inline code reading the outputs of the commands before it",
    "pip": "installs packages into the environment",
}
# Entry points whose documented calls also really run here, on the tiny fixtures the tests
# generate: {flag: the fixture that replaces its value} (the rest of the call is as documented).
RUN_ON_FIXTURES = {"tools.error_report": {"--run": "tiny_evaluation"}}
# Entry point -> (the entry point that parses the flags it does not know itself, the flags the
# forwarder adds to them).
FORWARDS = {"tools.audit_protocol": ("main_task_retrieval", ("--output_dir", "AUDIT_DIR/run"))}
PYTHONS = ("python", "python3")
RECORDED = (*PYTHONS, "torchrun", "pip")
# What the wrappers (run*.sh) and the stand-ins call; nothing else is on the sandbox's PATH.
COREUTILS = ("bash", "env", "sed", "tr", "grep", "cksum", "cut", "dirname", "basename", "mktemp", "cat",
             "head", "tail")
# First words of a command line: a code block starting with one must be labelled bash.
COMMAND_WORDS = {"python", "python3", "bash", "make", "torchrun", "srun", "pip"}
BLOCK_TIMEOUT_S = 60
ELIDED = "--elided_flags"  # what a documented "..." becomes
FENCE = re.compile(r"^\s*```\s*([\w-]*)\s*$")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")
# Paths of a run's outputs ("ckpts/<run>/pytorch_model.bin.4"): empty files in the sandbox.
CHECKPOINT_PATH = re.compile(r"(?<![\w/$.-])ckpts/[\w./-]+")


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass(frozen=True)
class Call:
    """One program call a block made (or printed): what it is, where it came from."""
    where: str
    program: str
    cwd: str
    args: tuple
    printed: bool = False


def code_blocks(page: Path) -> list[Block]:
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        fence = FENCE.match(line)
        if lang is None and fence:
            lang, start, body = fence.group(1).lower(), number, []
        elif lang is not None and fence and not fence.group(1):
            blocks.append(Block(str(page.relative_to(ROOT)), start, lang, "\n".join(body)))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def inline_commands(page: Path) -> list[Block]:
    """Inline code outside the fenced blocks that starts with a command, as one-line blocks."""
    commands, fenced = [], False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        spans = [] if fenced else INLINE_CODE.findall(line)
        commands += [Block(str(page.relative_to(ROOT)), number, "inline", command)
                     for command in map(inline_command, spans) if command]
    return commands


def inline_command(span: str) -> str:
    """The command an inline span shows; "" for prose (`python`, `--flag`); a mention of an
    entry point (`python -m tools.search`, `bash run.sh`) is its --help."""
    words = span.split()
    command = [w for w in words if not ASSIGNMENT.match(w)]
    if len(command) < 2 or first_command_word(span) not in COMMAND_WORDS:
        return ""
    if words in ([command[0], command[1]], [command[0], "-m", command[-1]]) and command[0] in (*PYTHONS, "bash"):
        return f"{span} --help"
    return usage_to_command(span)


def usage_to_command(span: str) -> str:
    span = re.sub(r"\s*\[[^\]\[]*\.\.\.\s*\]", "", span)  # an optional repeat: left out
    span = re.sub(r"(\w)\.\.\.(?=\s|$)", r"\1", span)  # DIR... -> DIR
    span = re.sub(r"<([^<>\s]+)>", r"\1", span)  # <train.json> -> train.json
    return re.sub(r"(?<=\s)([^\s|]+)(?:\|[^\s|]+)+", r"\1", span)  # msrvtt|vatex -> msrvtt


def all_blocks() -> list[Block]:
    return [block for page in markdown_pages() for block in code_blocks(page)]


def documented_commands() -> list[Block]:
    """The ```bash blocks, then the inline commands, of every page."""
    return ([b for b in all_blocks() if b.lang in ("bash", "sh", "shell")]
            + [command for page in markdown_pages() for command in inline_commands(page)])


def first_command_word(text: str) -> str:
    for line in text.splitlines():
        words = [w for w in line.split() if not ASSIGNMENT.match(w)]
        if words and not words[0].startswith("#"):
            return os.path.basename(words[0])
    return ""


def fill_placeholders(text: str) -> str:
    text = re.sub(r"(?<=\s)\.\.\.(?=[\s;]|$)", ELIDED, text, flags=re.MULTILINE)
    return re.sub(r"\[(--[^\]\[]*)\]", r"\1", text)


# ---- rule 1: the sandbox

def make_sandbox(tmp: Path, record_dir: Path) -> tuple[Path, dict]:
    work, bin_dir = tmp / "repo", tmp / "bin"
    work.mkdir()
    bin_dir.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in (".git", ".venv", "ckpts"):
            (work / entry.name).symlink_to(entry)
    for tool in COREUTILS:
        found = shutil.which(tool)
        assert found, f"{tool} is not installed; the documented wrappers need it"
        (bin_dir / tool).symlink_to(found)
    record = '#!/bin/bash\nprintf "%s\\0" "$(basename "$0")" "$PWD" "$@" > "$(mktemp "$DOC_RECORD_DIR/call.XXXXXX")"\n'
    for program in RECORDED:
        write_executable(bin_dir / program, record)
    write_executable(bin_dir / "srun", '#!/bin/bash\nexec "$@"\n')
    make = shutil.which("make")
    assert make, "make is not installed; README's `make test` / `make demo` need it"
    write_executable(bin_dir / "make", f'#!/bin/bash\nexec {make} -n "$@"\n')
    env = {"PATH": str(bin_dir), "HOME": str(tmp), "LANG": "C.UTF-8", "DOC_RECORD_DIR": str(record_dir)}
    return work, env


def write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def run_block(block: Block, tmp: Path) -> tuple[subprocess.CompletedProcess, list[Call]]:
    record_dir = tmp / "calls"
    record_dir.mkdir()
    work, env = make_sandbox(tmp, record_dir)
    script = fill_placeholders(block.text)
    for path in sorted(set(CHECKPOINT_PATH.findall(script))):
        if "." in Path(path).name:  # a checkpoint or state file; else a run's folder
            (work / path).parent.mkdir(parents=True, exist_ok=True)
            (work / path).touch()
        else:
            (work / path).mkdir(parents=True, exist_ok=True)
    result = subprocess.run([shutil.which("bash"), "-e", "-o", "pipefail", "-c", script], cwd=work, env=env,
                            capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    calls = []
    for path in sorted(record_dir.iterdir()):
        program, cwd, *args = path.read_text().split("\0")[:-1]
        calls.append(Call(block.where, program, str(Path(cwd).relative_to(work)), tuple(args)))
    calls += [call for line in result.stdout.splitlines() for call in printed_call(line, block.where)]
    return result, calls


def printed_call(line: str, where: str) -> list[Call]:
    """The call a printed line shows (run.sh --dry-run's torchrun, make -n's `.venv/bin/python
    bench/x.py`), if it calls this repository's code; pip, pytest and venv are not ours."""
    words = line.split()
    if not words or os.path.basename(words[0]) not in (*PYTHONS, "torchrun"):
        return []
    args = tuple(shlex.split(line)[1:])
    if args[:1] == ("-m",) and not is_repository_module(args[1]):
        return []
    return [Call(where, os.path.basename(words[0]), ".", args, printed=True)]


def is_repository_module(module: str) -> bool:
    top = module.split(".")[0]
    return (ROOT / top / "__init__.py").is_file() or (ROOT / f"{top}.py").is_file()


# ---- rule 2: the entry point of a call

def module_of_script(script: Path) -> str:
    """`a/b/x.py` -> "a.b.x" while the folders are packages; a top-level file -> its name."""
    parts = [script.stem]
    folder = script.parent
    while folder != ROOT and (folder / "__init__.py").is_file():
        parts.insert(0, folder.name)
        folder = folder.parent
    assert folder == ROOT, f"{script} is not importable from the repository root"
    return ".".join(parts)


def entry_point(call: Call) -> tuple[str, list]:
    """(module, "python -c" or another program, its arguments); AssertionError naming the call
    when unresolvable."""
    args = list(call.args)
    if call.program not in (*PYTHONS, "torchrun"):
        return call.program, args
    if call.program == "torchrun":
        scripts = [i for i, a in enumerate(args) if a.endswith(".py")]
        assert scripts, f"{call.where}: torchrun {' '.join(args)} names no script"
        args = args[scripts[0]:]
    else:
        while args and args[0].startswith("-") and args[0] not in ("-m", "-c"):
            args.pop(0)  # interpreter options (-u, -X ...)
    assert args, f"{call.where}: {call.program} without a script or module"
    if args[0] == "-c":
        return "python -c", args[2:]
    if args[0] == "-m":
        module = args[1]
        assert is_repository_module(module), f"{call.where}: module {module} is not part of this repository"
        return module, args[2:]
    script = (ROOT / call.cwd / args[0]).resolve()
    assert script.is_file() and ROOT in script.parents, (
        f"{call.where}: {call.program} {args[0]}: no such script in the repository (moved?)")
    return module_of_script(script), args[1:]


# ---- rule 3: parse in this process

class _Parsed(Exception):
    def __init__(self, extras: list):
        super().__init__("parsed")
        self.extras = extras


def with_required_flags(parser: argparse.ArgumentParser, args: list) -> list:
    """``args`` plus a value for each required option they lack (a documented "..." elided it)."""
    given = {a.split("=")[0] for a in args}
    for action in parser._actions:  # noqa: SLF001 - argparse keeps no public list
        if action.required and action.option_strings and not given & set(action.option_strings):
            args = [*args, action.option_strings[0], str(action.choices[0]) if action.choices else "0"]
    return args


@contextlib.contextmanager
def stop_after_parsing(elided: bool = False):
    """Make the first (outermost) argparse parse end the program, with what it left over."""
    depth = [0]

    def wrap(original):
        def parse(self, args=None, namespace=None):
            if elided and depth[0] == 0:
                args = with_required_flags(self, list(sys.argv[1:] if args is None else args))
            depth[0] += 1
            try:
                result = original(self, args, namespace)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                raise _Parsed(list(result[1]) if isinstance(result, tuple) else [])
            return result
        return parse

    parser = argparse.ArgumentParser
    with mock.patch.object(parser, "parse_args", wrap(parser.parse_args)), \
            mock.patch.object(parser, "parse_known_args", wrap(parser.parse_known_args)):
        yield


@dataclass
class Outcome:
    status: str  # "parsed", "exit", "error", "unparsed"
    code: object = None
    stdout: str = ""
    stderr: str = ""
    extras: tuple = ()


def parse_in_process(module: str, args: list, elided: bool = False, run: bool = False) -> Outcome:
    """``python -m module args`` in this process, stopped after parsing unless ``run``."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = [module, *args]
    try:
        stop = contextlib.nullcontext() if run else stop_after_parsing(elided)
        with stop, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: module already imported
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except _Parsed as parsed:
        return Outcome("parsed", 0, out.getvalue(), err.getvalue(), tuple(parsed.extras))
    except SystemExit as stop:
        return Outcome("exit", stop.code, out.getvalue(), err.getvalue())
    except Exception as error:  # noqa: BLE001 - reported with the command that raised it
        return Outcome("error", repr(error), out.getvalue(), err.getvalue())
    finally:
        sys.argv = saved
    return Outcome("ran" if run else "unparsed", None, out.getvalue(), err.getvalue())


def wants_help(args: list) -> bool:
    return "--help" in args or "-h" in args


def check_call(call: Call, module: str, args: list) -> list[str]:
    """Problems of one call's flags (rule 3); empty when its parser accepts them."""
    shown = f"{call.where}: {module} {' '.join(args)}"
    if module == "python -c" or module in RECORDED:  # inline code, or a program not of this repository
        return []
    elided = ELIDED in args
    args = [a for a in args if a != ELIDED]
    outcome = parse_in_process(module, args, elided)
    if outcome.status == "exit" and outcome.code in (0, None) and wants_help(args):
        return [] if outcome.stdout.strip() else [f"{shown}: --help printed nothing"]
    if outcome.status != "parsed":
        return [f"{shown}: {outcome.status} {outcome.code}\n{outcome.stderr.strip()[-800:]}"]
    extras = [a for a in outcome.extras if a != "--"]
    if extras and module in FORWARDS:
        receiver, added = FORWARDS[module]
        return check_call(call, receiver, [*extras, *added, *([ELIDED] if elided else [])])
    return [f"{shown}: unrecognized {extras}"] if extras else []


# ---- the tests

@pytest.fixture(scope="module")
def doc_runs(tmp_path_factory) -> list[tuple[Block, subprocess.CompletedProcess, list[Call]]]:
    return [(block, *run_block(block, tmp_path_factory.mktemp("block"))) for block in documented_commands()]


def resolved_calls(doc_runs):
    """(call, entry point, arguments) of every recorded call whose entry point exists (the
    others fail test_every_call_names_an_entry_point_that_accepts_its_flags)."""
    for _, _, calls in doc_runs:
        for call in calls:
            try:
                yield (call, *entry_point(call))
            except AssertionError:
                continue


def test_the_docs_have_commands_to_check(doc_runs):
    # The extractor is only as good as its fence pattern: README's quick start must be found.
    assert any(b.page == "README.md" and "make test" in b.text for b, _, _ in doc_runs)
    assert sum(len(calls) for _, _, calls in doc_runs) >= 20


def test_unlabelled_blocks_hold_no_commands():
    unlabelled = [f"{b.where}: starts with `{first_command_word(b.text)}`" for b in all_blocks()
                  if b.lang not in ("bash", "sh", "shell") and first_command_word(b.text) in COMMAND_WORDS]
    assert not unlabelled, ("label these code blocks ```bash so that tests/test_doc_commands.py runs them:\n"
                            + "\n".join(unlabelled))


def test_every_block_runs_in_the_sandbox(doc_runs):
    failed = [f"{b.where} (exit {r.returncode}):\n{r.stderr.strip()[-1500:]}" for b, r, _ in doc_runs
              if r.returncode != 0]
    assert not failed, ("documented commands fail (fix the command, or the script it calls):\n"
                        + "\n\n".join(failed))


def test_every_call_names_an_entry_point_that_accepts_its_flags(doc_runs):
    problems = []
    for _, _, calls in doc_runs:
        for call in calls:
            try:
                module, args = entry_point(call)
            except AssertionError as error:
                problems.append(str(error))
                continue
            problems += check_call(call, module, args)
    assert not problems, "documented commands that do not parse:\n" + "\n\n".join(problems)


def test_calls_not_run_are_explained(doc_runs):
    unexplained, used = [], set()
    for call, module, args in resolved_calls(doc_runs):
        if call.printed or wants_help(args) or module in RUN_ON_FIXTURES:
            continue
        used.add(module)
        if module not in NOT_RUN:
            unexplained.append(f"{call.where}: {module} {' '.join(args)}")
    assert not unexplained, ("documented commands that neither run in seconds (--help, --list-presets, "
                             "--dry-run) nor appear in NOT_RUN with the reason:\n" + "\n".join(unexplained))
    stale = sorted(set(NOT_RUN) - used)
    assert not stale, f"NOT_RUN entries no documented command needs (remove them): {stale}"


def tiny_evaluation(tmp: Path) -> str:
    """An evaluation folder with a --dump_topk dump: the tiny test data and weights, evaluated as
    tests/test_robustness.py does (what `main_task_retrieval.py --do_eval --dump_topk K` writes)."""
    import main_task_retrieval
    from tests.datagen import make_msrvtt
    from tests.test_train_e2e import tiny_flags, write_tiny_checkpoints
    data = make_msrvtt(str(tmp / "data"), n_videos=4, n_test=3, seconds=1.0)
    out = tmp / "evaluation"
    main_task_retrieval.main(["--do_eval", *tiny_flags(data, write_tiny_checkpoints(str(tmp)), out),
                              "--dump_topk", "2"])
    return str(out)


FIXTURES = {"tiny_evaluation": tiny_evaluation}


def with_fixtures(args: list, fixture_of_flag: dict, built: dict) -> list:
    args = list(args)
    for i, arg in enumerate(args[:-1]):
        if arg in fixture_of_flag:
            args[i + 1] = built[fixture_of_flag[arg]]
    return args


def test_calls_on_fixtures_run(doc_runs, tmp_path, monkeypatch):
    built = {}
    for name in {fixture for flags in RUN_ON_FIXTURES.values() for fixture in flags.values()}:
        (tmp_path / name).mkdir()
        built[name] = FIXTURES[name](tmp_path / name)
    monkeypatch.chdir(tmp_path)  # a relative --output lands here
    ran, failed = set(), []
    for call, module, args in resolved_calls(doc_runs):
        if call.printed or module not in RUN_ON_FIXTURES or wants_help(args):
            continue
        args = with_fixtures([a for a in args if a != ELIDED], RUN_ON_FIXTURES[module], built)
        outcome = parse_in_process(module, args, run=True)
        if outcome.status != "ran" and outcome.code not in (0, None):
            failed.append(f"{call.where}: {module} {' '.join(args)}: {outcome.status} {outcome.code}\n"
                          f"{outcome.stderr.strip()[-800:]}")
        ran.add(module)
    assert not failed, "documented commands that fail on the tiny fixtures:\n" + "\n\n".join(failed)
    assert ran == set(RUN_ON_FIXTURES), f"RUN_ON_FIXTURES entries no command uses: {set(RUN_ON_FIXTURES) - ran}"
    assert (Path(built["tiny_evaluation"]) / "error_report.md").is_file()  # error_report's default output


def test_the_sandbox_records_instead_of_running(tmp_path):
    block = Block("test", 1, "bash", "python -m tools.search --help [--top 3] ...\n"
                                     "bash run.sh --dry-run --seed 1\nmake test\n"
                                     "CHECKPOINT=ckpts/x/pytorch_model.bin.0 bash run_eval.sh")
    result, calls = run_block(block, tmp_path)
    assert result.returncode == 0, result.stderr
    recorded = {(c.program, c.args[0] if c.args else "", c.printed) for c in calls}
    assert ("python", "-m", False) in recorded  # the --help call, recorded
    assert ("torchrun", "--nnodes", True) in recorded  # the dry run's printed command
    assert ("torchrun", "--standalone", False) in recorded  # run_eval.sh's call, recorded
    assert "--top" in calls[0].args or any("--top" in c.args for c in calls)
    assert "$(BIN)/python" not in result.stdout and "pytest tests" in result.stdout  # make -n
    assert printed_call(".venv/bin/python -m pytest tests", "x") == []  # not this repository's
    assert printed_call(".venv/bin/python bench/gpu_check.py", "x")[0].args == ("bench/gpu_check.py",)


def test_flag_checks_catch_wrong_commands():
    call = Call("test", "python", ".", ())
    assert check_call(call, "tools.search", ["--help"]) == []
    assert check_call(call, "tools.error_report", ["--run", "x", "--worst", "3"]) == []
    assert check_call(call, "tools.error_report", ["--run", "x", "--no_such_flag"])
    evaluation = ["--init_model", "m", "--data_path", "d", "--features_path", "v"]
    assert check_call(call, "tools.audit_protocol", ["--audit_dir", "a", "--", *evaluation]) == []
    assert check_call(call, "tools.audit_protocol", ["--audit_dir", "a", "--", *evaluation, "--no_such_flag"])
    with pytest.raises(AssertionError, match="moved"):
        entry_point(Call("test", "python", ".", ("tools/no_such_tool.py",)))
    assert entry_point(Call("test", "python", ".", ("bench/score_bench.py", "--x"))) == ("bench.score_bench",
                                                                                         ["--x"])
    assert [inline_command(s) for s in ("python", "python -m tools.x", "bash run.sh", "make demo",
                                        "X=1 bash run.sh")] == ["", "python -m tools.x --help",
                                                                "bash run.sh --help", "make demo", "X=1 bash run.sh"]
    assert usage_to_command("CHECKPOINT=... bash run_eval.sh") == "CHECKPOINT=... bash run_eval.sh"
    assert usage_to_command("python -m x --d msrvtt|vatex --r DIR [--dl] --run L DIR... [--run ...] <a.json>") == (
        "python -m x --d msrvtt --r DIR [--dl] --run L DIR a.json")
    assert fill_placeholders("a --b ... [--c d]; x ...") == f"a --b {ELIDED} --c d; x {ELIDED}"
    assert check_call(call, "main_task_retrieval", ["--do_train", "--gate", "soft"])  # required flags
    assert check_call(call, "main_task_retrieval", ["--do_train", "--gate", "soft", ELIDED]) == []
    assert check_call(call, "main_task_retrieval", ["--do_train", "--gate", "bad", ELIDED])
