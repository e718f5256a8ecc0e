"""Put the scorers' weights into the Hugging Face cache ahead of time, so replicas never download at start.

A replica that downloads gigabytes when it starts comes up minutes late, fails on nodes without internet and
downloads again on every autoscale. `plan()` works out from the scorers' options which hub repos and which files
of them the loaders read (scorers.hub for transformers ids, scorers.openclip for open_clip names, tags and
`hf-hub:` ids); `fetch()` downloads exactly those through huggingface_hub's own snapshot_download, so they land
in the cache layout that the loaders look in with HF_HUB_OFFLINE=1. Local files are only checked. The endpoint,
token and cache are huggingface_hub's usual settings, so the same code runs against a mirror.
"""

from __future__ import annotations

import os
import re
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from . import registry

# What a scorer's options name, by role, is its registry entry's `fetch` (scorers.registry). "model": a
# transformers model (configs + weights); "config": tokenizer / processor / config files only; "open_clip": an
# open_clip model + pretrained pair; "file": a local file. Scorers without rules are read generically: see _rules.
CONFIG_FILE = re.compile(r"^[^/]+\.(json|txt|jinja|model|tiktoken)$")  # configs, tokenizers, chat templates
SAFETENSORS = re.compile(r"^model(-\d+-of-\d+)?\.safetensors(\.index\.json)?$")
PYTORCH_BIN = re.compile(r"^pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?$")
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class FetchError(RuntimeError):
    """A source that cannot be fetched or checked; the message names it and says what to do."""


@dataclass
class RepoNeed:
    """One hub repo and why: roles are "model", "config", "open_clip_hub" or "open_clip:<filename>"."""

    repo_id: str
    roles: set[str] = field(default_factory=set)
    scorers: list[str] = field(default_factory=list)


@dataclass
class FileNeed:
    scorer: str
    option: str
    path: str


@dataclass
class Plan:
    repos: dict[str, RepoNeed] = field(default_factory=dict)
    files: list[FileNeed] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # sources skipped, and why

    def need(self, repo_id: str, role: str, scorer: str) -> None:
        entry = self.repos.setdefault(repo_id, RepoNeed(repo_id))
        entry.roles.add(role)
        if scorer not in entry.scorers:
            entry.scorers.append(scorer)


@dataclass
class RepoResult:
    repo_id: str
    scorers: list[str]
    commit: str | None = None
    files: dict[str, int] = field(default_factory=dict)  # path -> size
    fetched: dict[str, int] = field(default_factory=dict)  # the part of files not cached before
    error: str | None = None


def _rules(name: str, options: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    rules = registry.get(name).fetch if name in registry.names() else None
    if rules is not None:
        return rules
    if "pretrained" in options:
        return (("model", "open_clip"),)
    return tuple((key, role) for key, role in (("model", "model"), ("processor", "config")) if key in options)


def _is_local(value: str) -> bool:
    """A path rather than a hub id: it exists, or it is written like a path (hub ids are `org/name`)."""
    return Path(value).expanduser().exists() or value.startswith(("/", ".", "~")) or value.count("/") > 1


def plan(scorers: Mapping[str, Mapping[str, Any]] | Iterable[tuple[str, Mapping[str, Any]]]) -> Plan:
    """What the scorers' options need: {scorer name: its load_scorer options (defaults included)}, or such
    pairs (a Serve config with several applications may name a scorer twice)."""
    result = Plan()
    for name, options in (scorers.items() if isinstance(scorers, Mapping) else scorers):
        for option, role in _rules(name, options):
            value = options.get(option)
            if role == "config" and value is None:
                value = options.get("model")  # VQAScore: the processor defaults to the model's own
            if value is None:
                continue
            if role == "open_clip":
                _plan_open_clip(result, name, value, options.get("pretrained"))
            elif role == "file":
                result.files.append(FileNeed(name, option, _head_path(os.fspath(value)) if option == "head" else os.fspath(value)))
            elif isinstance(value, str) and value.startswith("local-dir:"):
                result.notes.append(f"{name}: {option} {value} is local: skipped")
            elif _is_local(os.fspath(value)):
                result.files.append(FileNeed(name, option, os.fspath(value)))
            else:
                result.need(value, role, name)
    return result


def _head_path(value: str) -> str:
    """The aesthetic head's default name stands for $SCENEREF_AESTHETIC_HEAD when that is set, as in the loader."""
    from .aesthetic import DEFAULT_HEAD, HEAD_ENV

    return os.environ[HEAD_ENV] if value == DEFAULT_HEAD and os.environ.get(HEAD_ENV) else value


def _plan_open_clip(result: Plan, name: str, model: Any, pretrained: Any) -> None:
    import open_clip

    if isinstance(model, dict) or str(model).endswith(".json"):
        if not isinstance(model, dict):
            result.files.append(FileNeed(name, "model", str(model)))
        if pretrained is not None:
            result.files.append(FileNeed(name, "pretrained", str(pretrained)))
        return
    model = str(model)
    if model.startswith("local-dir:"):
        result.notes.append(f"{name}: model {model} is local: skipped")
    elif model.startswith("hf-hub:"):
        result.need(model[len("hf-hub:"):], "open_clip_hub", name)
    elif pretrained is None:
        result.notes.append(f"{name}: {model} with pretrained=None has no weights to fetch")
    elif _is_local(str(pretrained)) or str(pretrained).endswith((".pt", ".pth", ".bin", ".safetensors")):
        result.files.append(FileNeed(name, "pretrained", str(pretrained)))
    else:
        cfg = open_clip.get_pretrained_cfg(model, str(pretrained))
        if not cfg:
            raise FetchError(f"{name}: {pretrained!r} is not a pretrained tag of open_clip model {model!r} "
                             f"(tags: {open_clip.list_pretrained_tags_by_model(model)})")
        if not cfg.get("hf_hub"):
            raise FetchError(f"{name}: open_clip {model} / {pretrained} has no Hugging Face source to fetch from")
        repo, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" or "org/repo/file", as open_clip reads it
        result.need(repo, f"open_clip:{filename or OPEN_CLIP_WEIGHTS[1]}", name)
    if not model.startswith(("hf-hub:", "local-dir:")):
        # Architectures with a Hugging Face text tokenizer (SigLIP, ...) load it by id when the model is built.
        tokenizer = ((open_clip.get_model_config(model) or {}).get("text_cfg") or {}).get("hf_tokenizer_name")
        if tokenizer:
            result.need(tokenizer, "config", name)


def select_files(repo_id: str, roles: set[str], listing: Mapping[str, int]) -> list[str]:
    """The files of a repo that the loaders read for these roles, given its listing (path -> size)."""
    chosen: set[str] = set()
    for role in sorted(roles):
        if role in ("model", "config"):
            chosen |= {p for p in listing if CONFIG_FILE.match(p) and not p.endswith(".index.json")}
        if role == "model":
            weights = [p for p in listing if SAFETENSORS.match(p)] or [p for p in listing if PYTORCH_BIN.match(p)]
            if not any(not p.endswith(".json") for p in weights):
                raise FetchError(f"{repo_id} has no transformers weights (model*.safetensors or pytorch_model*.bin)")
            chosen |= set(weights)
        if role == "open_clip_hub":
            chosen |= {p for p in ("open_clip_config.json",) if p in listing}
            role = f"open_clip:{OPEN_CLIP_WEIGHTS[1]}"
        if role.startswith("open_clip:"):
            chosen.add(_open_clip_file(repo_id, role.split(":", 1)[1], listing))
    return sorted(chosen)


def _open_clip_file(repo_id: str, filename: str, listing: Mapping[str, int]) -> str:
    """The checkpoint open_clip (and scorers.openclip's cache lookup) takes: its safetensors twin first."""
    stem, ext = os.path.splitext(filename)
    twins = ["open_clip_model.safetensors"] if filename == OPEN_CLIP_WEIGHTS[1] else (
        [stem + ".safetensors"] if ext in (".bin", ".pth", ".pt") else [])
    for candidate in twins + [filename]:
        if candidate in listing:
            return candidate
    raise FetchError(f"{repo_id} has no open_clip checkpoint {' or '.join(twins + [filename])}")


def hub_cache_dir() -> str:
    """huggingface_hub's cache folder, read now (its constants are read once, at import)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expanduser(explicit)
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def fetch_repo(need: RepoNeed, *, cache_dir: str, endpoint: str | None, token: str | None,
               revision: str = "main", dry_run: bool = False) -> RepoResult:
    """List the repo, choose its files, and download the ones not cached yet (nothing when dry_run)."""
    from huggingface_hub import HfApi, snapshot_download, try_to_load_from_cache
    from huggingface_hub.hf_api import RepoFile

    result = RepoResult(need.repo_id, need.scorers)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        result.commit = api.repo_info(need.repo_id, revision=revision).sha
        listing = {f.path: int(f.size or 0) for f in api.list_repo_tree(need.repo_id, revision=result.commit, recursive=True)
                   if isinstance(f, RepoFile)}
        files = select_files(need.repo_id, need.roles, listing)
        result.files = {p: listing[p] for p in files}
        result.fetched = {p: size for p, size in result.files.items()
                          if not isinstance(try_to_load_from_cache(need.repo_id, p, cache_dir=cache_dir, revision=result.commit), str)}
        if not dry_run:
            snapshot_download(need.repo_id, revision=revision, cache_dir=cache_dir, endpoint=endpoint, token=token,
                              allow_patterns=[_literal(p) for p in files])
    except FetchError as exc:
        result.error = str(exc)
    except Exception as exc:  # the hub's typed errors, connection errors: explained, never a traceback
        result.error = explain(need.repo_id, exc, endpoint)
    return result


def _literal(path: str) -> str:
    """An fnmatch pattern that matches exactly this path."""
    return re.sub(r"([\[\]*?])", r"[\1]", path)


def explain(repo_id: str, exc: BaseException, endpoint: str | None) -> str:
    """What went wrong with a repo, and what to do about it."""
    from huggingface_hub import errors

    where = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    chain, cause = [], exc
    while cause is not None and len(chain) < 6:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    first = lambda kind: next((e for e in chain if isinstance(e, kind)), None)  # noqa: E731
    if first(errors.GatedRepoError):
        return (f"{repo_id} is gated on {where}: accept its licence on the model page with your account, then set "
                "HF_TOKEN to a token of that account")
    if first(errors.RevisionNotFoundError):
        return f"{repo_id}: revision not found on {where}"
    if first(errors.RepositoryNotFoundError):
        return (f"{repo_id} not found on {where} (404): check the id in the config; a private repo needs HF_TOKEN; "
                "a mirror is set with HF_ENDPOINT or --endpoint")
    if first(errors.OfflineModeIsEnabled):
        return f"{repo_id}: HF_HUB_OFFLINE is set: unset it for the fetch (replicas keep it set)"
    if first(errors.HfHubHTTPError):
        return f"{repo_id}: {where} answered an error: {first(errors.HfHubHTTPError)}. Check HF_TOKEN and HF_ENDPOINT"
    return (f"{repo_id}: could not fetch from {where} ({type(exc).__name__}: {exc}). Check the network or proxy, "
            "or set HF_ENDPOINT / --endpoint to a reachable mirror")


def check_file(need: FileNeed, url: str | None = None, verify: Callable[[Path], Any] | None = None) -> tuple[int, int]:
    """A local file must exist; when it does not and a URL is given, it is downloaded there (whole or not at
    all) and checked with verify. Returns (its size, bytes downloaded)."""
    path = Path(need.path).expanduser()
    if path.exists():
        return (path.stat().st_size if path.is_file() else 0), 0
    if url is None:
        raise FetchError(f"{need.scorer}: {need.option} {need.path} does not exist. Put the file there (or change "
                         f"scoring.{need.scorer}.{need.option} in the config)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        if verify is not None:
            verify(Path(tmp))
        os.replace(tmp, path)
    except Exception as exc:
        raise FetchError(f"{need.scorer}: could not download {need.option} from {url} to {path}: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path.stat().st_size, path.stat().st_size


def size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def fetch_all(
    work: Plan, *, cache_dir: str, endpoint: str | None = None, token: str | None = None, dry_run: bool = False,
    file_urls: Mapping[tuple[str, str], str] | None = None, out: Callable[[str], None] = print,
    err: Callable[[str], None] = print,
) -> int:
    """Fetch (or with dry_run list) everything in the plan, printing per repo what and how many bytes.
    Goes on past a failed source and returns 1 when any failed, else 0."""
    failed, total = 0, 0
    verb = "would fetch" if dry_run else "fetched"
    for note in work.notes:
        out(note)
    for need in work.repos.values():
        got = fetch_repo(need, cache_dir=cache_dir, endpoint=endpoint, token=token, dry_run=dry_run)
        who = ", ".join(got.scorers)
        if got.error:
            failed += 1
            err(f"error: [{who}] {got.error}")
            continue
        new = sum(got.fetched.values())
        total += new
        out(f"[{who}] {got.repo_id} @ {got.commit[:10]}: {len(got.files)} files, {size(sum(got.files.values()))}; "
            f"{verb} {len(got.fetched)} files, {size(new)}")
        for path, n in got.files.items():
            out(f"    {path}  {size(n)}{'' if path in got.fetched else '  (cached)'}")
    for need in work.files:
        url = (file_urls or {}).get((need.scorer, need.option))
        try:
            n, new = check_file(need, None if dry_run else url, _verifier(need))
        except FetchError as exc:
            if dry_run and url:
                out(f"[{need.scorer}] {need.option} {need.path}: missing; {verb} it from {url}")
                continue
            failed += 1
            err(f"error: {exc}")
            continue
        total += new
        out(f"[{need.scorer}] {need.option} {need.path}: " + (f"downloaded from {url}, {size(new)}" if new else f"present, {size(n)}"))
    out(f"{verb} {size(total)} into {cache_dir}" + (f"; {failed} source(s) failed" if failed else ""))
    return 1 if failed else 0


def _verifier(need: FileNeed) -> Callable[[Path], Any] | None:
    """A downloaded aesthetic head must load as one: a truncated file or an HTML error page is refused."""
    if need.option == "head":
        from .aesthetic import load_head

        return lambda path: load_head(path)
    return None
