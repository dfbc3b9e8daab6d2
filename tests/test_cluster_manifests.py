"""Tests of cluster/: KubeRay manifests against the real CRDs, job command lines, launcher config, runtime env."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import os
import re
import runpy
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gatrep import cli

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
INT32 = (-(2**31), 2**31 - 1)
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 3 MB of YAML: the C parser is 10x faster


def _shared_candidates(repo: Path = REPO) -> list[Path]:
    """Where a shared folder may be, in order: $GATREP_SHARED, then `shared` in the repository or beside it
    or beside any folder above it (a clean clone may sit deeper than the checkout the folder was set up for)."""
    explicit = [Path(os.environ["GATREP_SHARED"])] if os.environ.get("GATREP_SHARED") else []
    return explicit + [folder / "shared" for folder in (repo, *repo.parents)]


def _kuberay_crds(repo: Path = REPO) -> Path:
    """The kuberay-crds folder of the first shared folder that has one.

    Skips the calling test where there is none, and fails it instead under CI=true, so that CI cannot pass
    without validating the manifests against the CRDs.
    """
    candidates = _shared_candidates(repo)
    found = next((c / "kuberay-crds" for c in candidates if (c / "kuberay-crds").is_dir()), None)
    if found is not None:
        return found
    reason = ("no KubeRay CRDs: none of " + ", ".join(f"{c}/kuberay-crds" for c in candidates) + " exists; "
              "set GATREP_SHARED to the shared folder that holds kuberay-crds/ (they are not copied into the project)")
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file name #document index, document) for every YAML document under cluster/kuberay/."""
    found = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for i, doc in enumerate(yaml.load_all(path.read_text(), Loader=Loader)):
            if doc is not None:
                found.append((f"{path.name}#{i}", doc))
    return found


MANIFESTS = _manifests()
BY_KIND = {doc["kind"]: doc for _, doc in MANIFESTS}


# ----------------------------------------------------------------------------------------------
# The CRDs' openAPIV3Schema as jsonschema validators


@cache
def _crd_schemas() -> dict[tuple[str, str, str], dict[str, Any]]:
    """(group, version, kind) -> openAPIV3Schema of every KubeRay CRD (found as `_kuberay_crds` says)."""
    schemas = {}
    for path in sorted(_kuberay_crds().glob("*.yaml")):
        for crd in yaml.load_all(path.read_text(), Loader=Loader):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            for version in crd["spec"]["versions"]:
                key = (crd["spec"]["group"], version["name"], crd["spec"]["names"]["kind"])
                schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


def test_crds_are_found_above_a_clone_and_through_gatrep_shared(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATREP_SHARED", raising=False)
    clone = tmp_path / "checkouts" / "issue-10" / "gatrep"
    (tmp_path / "shared" / "kuberay-crds").mkdir(parents=True)
    assert _kuberay_crds(clone) == tmp_path / "shared" / "kuberay-crds"
    (tmp_path / "elsewhere" / "kuberay-crds").mkdir(parents=True)
    monkeypatch.setenv("GATREP_SHARED", str(tmp_path / "elsewhere"))
    assert _kuberay_crds(clone) == tmp_path / "elsewhere" / "kuberay-crds"


@pytest.mark.parametrize(("ci", "outcome"), [("", pytest.skip.Exception), ("true", pytest.fail.Exception)])
def test_missing_crds_skip_but_fail_under_ci(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]) -> None:
    monkeypatch.delenv("GATREP_SHARED", raising=False)
    monkeypatch.setenv("CI", ci)
    clone = tmp_path / "gatrep"
    assert not any((c / "kuberay-crds").is_dir() for c in _shared_candidates(clone)), "CRDs above the tmp folder"
    searched = f"none of {clone}/shared/kuberay-crds, {tmp_path}/shared/kuberay-crds, "
    with pytest.raises(outcome, match=re.escape(searched)):
        _kuberay_crds(clone)


def _structural(node: Any) -> Any:
    """A copy of an openAPIV3Schema that jsonschema checks the way the API server does on create.

    - objects with `properties` refuse unknown fields (kubectl's strict field validation; the server
      would otherwise drop them silently), unless x-kubernetes-preserve-unknown-fields;
    - x-kubernetes-int-or-string accepts an integer or a string; `nullable` accepts null.
    """
    if isinstance(node, list):
        return [_structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    keep = ("properties", "enum", "default", "required", "x-kubernetes-list-map-keys", "x-kubernetes-validations")
    out = {k: (v if k in keep else _structural(v)) for k, v in node.items()}
    if "properties" in out:
        out["properties"] = {name: _structural(sub) for name, sub in node["properties"].items()}
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _list_type(validator: Any, list_type: str, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    """x-kubernetes-list-type: `set` items are unique, `map` items are unique by their list-map-keys."""
    if not isinstance(instance, list) or list_type == "atomic":
        return
    if list_type == "set":
        keys = [repr(item) for item in instance]
    else:
        defaults = schema.get("items", {}).get("properties", {})
        names = schema["x-kubernetes-list-map-keys"]
        keys = [repr(tuple(item.get(k, defaults.get(k, {}).get("default")) for k in names)) for item in instance]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        yield jsonschema.ValidationError(f"duplicate items in a list of type {list_type}: {', '.join(duplicates)}")


def _cel_rules(validator: Any, rules: list[dict[str, str]], instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    """x-kubernetes-validations are CEL: transition rules (oldSelf) hold on create; others cannot be run here."""
    for rule in rules:
        if "oldSelf" not in rule["rule"]:
            yield jsonschema.ValidationError(
                f"this field has a CEL rule jsonschema cannot evaluate ({rule['rule']!r}: {rule.get('message')}); "
                "check it with `kubectl apply --dry-run=server` and teach this test the rule"
            )


_FORMATS = jsonschema.FormatChecker(formats=())
_FORMATS.checks("int32")(lambda v: not isinstance(v, int) or INT32[0] <= v <= INT32[1])
_FORMATS.checks("int64")(lambda v: not isinstance(v, int) or -(2**63) <= v < 2**63)
KubeValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules},
)


def _errors(doc: dict[str, Any]) -> list[str]:
    """Every way `doc` disagrees with its kind's CRD, as 'path: message' lines (empty when valid)."""
    group, _, version = doc.get("apiVersion", "").rpartition("/")
    schema = _crd_schemas().get((group, version, doc.get("kind", "")))
    if schema is None:
        return [f"no CRD for apiVersion {doc.get('apiVersion')!r} kind {doc.get('kind')!r}"]
    validator = KubeValidator(_structural_cached(group, version, doc["kind"]), format_checker=_FORMATS)
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
              for e in validator.iter_errors(doc)]
    name = doc.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 40:
        errors.append(f"metadata.name: {name!r} is not a short DNS-1123 label (KubeRay derives pod names from it)")
    return errors


@cache
def _structural_cached(group: str, version: str, kind: str) -> dict[str, Any]:
    return _structural(_crd_schemas()[(group, version, kind)])


# ----------------------------------------------------------------------------------------------
# KubeRay manifests


def test_kuberay_folder_holds_the_three_resources() -> None:
    assert sorted(BY_KIND) == ["RayCluster", "RayCronJob", "RayJob"]


def test_kuberay_manifests_are_the_generators_output() -> None:
    generated = runpy.run_path(str(KUBERAY / "generate.py"), run_name="kuberay_generate")["generate"]()
    assert set(generated) == set(KUBERAY.glob("*.yaml")), "every manifest in cluster/kuberay/ is generated"
    for path, text in generated.items():
        assert path.read_text() == text, (
            f"{path.relative_to(REPO)} differs from what cluster/kuberay/generate.py writes: edit "
            "cluster/kuberay/base/raycluster-spec.yaml or the file's template in generate.py, not the file, "
            "then rerun `python cluster/kuberay/generate.py`"
        )


@pytest.mark.parametrize("doc", [d for _, d in MANIFESTS], ids=[n for n, _ in MANIFESTS])
def test_manifest_validates_against_its_crd(doc: dict[str, Any]) -> None:
    errors = _errors(doc)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("mistake, expected", [
    (lambda d: d["spec"].__setitem__("entryPoint", "python -m jobs.pipeline"), "entryPoint"),
    (lambda d: _cluster(d)["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0), "is not of type 'string'"),
    (lambda d: _cluster(d)["workerGroupSpecs"][0].__setitem__("maxReplicas", 2**31), "int32"),
    (lambda d: _cluster(d)["workerGroupSpecs"][0].pop("groupName"), "'groupName' is a required property"),
    (lambda d: _containers(d)[0]["resources"]["limits"].__setitem__("memory", "lots"), "does not match"),
    (lambda d: _containers(d).append(copy.deepcopy(_containers(d)[0])), "duplicate items"),
    (lambda d: _cluster(d).__setitem__("managedBy", "me"), "CEL rule"),
    (lambda d: d["metadata"].__setitem__("name", "Gatrep_Pipeline"), "DNS-1123"),
])
def test_validation_catches_mistakes(mistake: Any, expected: str) -> None:
    doc = copy.deepcopy(BY_KIND["RayJob"])
    assert not _errors(doc)
    mistake(doc)
    assert any(expected in e for e in _errors(doc)), _errors(doc)


def _cluster(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec of a RayCluster, RayJob or RayCronJob."""
    spec = doc["spec"]
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayCronJob": lambda: spec["jobTemplate"]["rayClusterSpec"]}[doc["kind"]]()


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The head pod's containers."""
    return _cluster(doc)["headGroupSpec"]["template"]["spec"]["containers"]


def _groups(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in _cluster(doc)["workerGroupSpecs"]}


def test_job_clusters_match_the_standing_cluster() -> None:
    standing = _cluster(BY_KIND["RayCluster"])
    for kind in ("RayJob", "RayCronJob"):
        spec = copy.deepcopy(_cluster(BY_KIND[kind]))
        gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
        # The one intended difference: job clusters start with a GPU pod (jobs.embed looks for GPUs at start).
        assert gpu["minReplicas"] >= 1 and gpu["replicas"] >= gpu["minReplicas"], kind
        gpu["minReplicas"] = gpu["replicas"] = 0
        assert spec == standing, f"{kind}'s rayClusterSpec differs from raycluster.yaml's spec"


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayCronJob"])
def test_groups_resources_and_images(kind: str) -> None:
    import ray

    cluster = _cluster(BY_KIND[kind])
    ray_version = cluster["rayVersion"]
    assert ray_version.split(".")[:2] == ray.__version__.split(".")[:2], "rayVersion differs from the installed Ray"
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = _groups(BY_KIND[kind])
    assert set(groups) == {"gpu", "cpu"}
    pods = [("head", cluster["headGroupSpec"]["template"])] + [(n, g["template"]) for n, g in groups.items()]
    for name, template in pods:
        for container in template["spec"]["containers"]:
            image = container["image"]
            assert f"ray{ray_version}-py311-" in image, f"{name}: image {image} is not built on Ray {ray_version}"
            assert image.endswith("-gpu") == (name == "gpu"), f"{name}: {image}"
            limits = container["resources"]["limits"]
            assert ("nvidia.com/gpu" in limits) == (name == "gpu"), f"{name}: GPU limit"
            assert container["resources"]["requests"] == limits, f"{name}: requests differ from limits"
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]


def test_dockerfile_base_matches_the_manifests() -> None:
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)$", dockerfile, re.MULTILINE)
    ray_version = _cluster(BY_KIND["RayCluster"])["rayVersion"]
    assert base is not None and base.group(1) == f"rayproject/ray:{ray_version}-py311-gpu"


# ----------------------------------------------------------------------------------------------
# Job command lines


def _entrypoints() -> dict[str, str]:
    return {"RayJob": BY_KIND["RayJob"]["spec"]["entrypoint"],
            "RayCronJob": BY_KIND["RayCronJob"]["spec"]["jobTemplate"]["entrypoint"]}


def _parse_command(command: str) -> tuple[str, dict[str, str]]:
    """(job name, {flag: value}) of `python -m jobs.<name> --flag value ...`; refuses anything else."""
    words = shlex.split(command)
    assert words[:2] == ["python", "-m"] and words[2].startswith("jobs."), command
    flags = words[3:]
    pairs = len(flags) % 2 == 0 and all(f.startswith("--") for f in flags[::2])
    assert pairs, f"flags are not --name value pairs: {command}"
    return words[2].removeprefix("jobs."), dict(zip(flags[::2], flags[1::2], strict=True))


@cache
def _flags(job: str) -> tuple[set[str], set[str]]:
    """(every flag, the required flags) of `python -m jobs.<job>`, from the job's config class."""
    fields = dataclasses.fields(cli.job_module(job).CONFIG)
    flag = {f.name: "--" + f.name.replace("_", "-") for f in fields}
    required = {flag[f.name] for f in fields if f.default is dataclasses.MISSING}
    return {*flag.values(), "--config"}, required


def test_entrypoints_run_known_jobs_with_uri_flags() -> None:
    jobs = {kind: _parse_command(command) for kind, command in _entrypoints().items()}
    assert jobs["RayJob"][0] == "pipeline" and jobs["RayCronJob"][0] == "reindex"
    for job, flags in jobs.values():
        assert job in cli.JOBS
        assert set(flags) == {"--input", "--run"} and all("://" in v for v in flags.values()), flags


def _documented_commands() -> list[str]:
    """Every `python -m jobs.X --flag ...` command in README.md and cluster/ (docs, manifests, entrypoints)."""
    texts = [p.read_text() for p in [REPO / "README.md", *sorted(CLUSTER.rglob("*"))] if p.suffix in (".md", ".yaml")]
    # A backslash at the end of a line, or a flag at the start of the next (a folded YAML entrypoint), continues it.
    lines = [line for t in [*texts, *_entrypoints().values()]
             for line in re.sub(r"\\\n\s*|\n\s*(?=--\w)", " ", t).splitlines()]
    # A command runs to the end of its line, a shell comment, or the end of inline code.
    return [re.split(r"\s#|`|\|", m.group(0))[0] for line in lines
            for m in re.finditer(r"python -m jobs\.\w+.*", line)]


def check_command(command: str) -> None:
    """Refuse a command whose job does not exist, that misses a flag the job requires, or names an unknown flag."""
    job = command.split()[2].removeprefix("jobs.")
    assert job in cli.JOBS, f"unknown job in {command!r}"
    known, required = _flags(job)
    given = set(re.findall(r"(?<!\S)(--[\w-]+)", command))
    if given & {"--help", "--list"}:
        return
    assert given <= known, f"jobs.{job} has no {sorted(given - known)} (in {command!r})"
    assert required <= given, f"jobs.{job} needs {sorted(required - given)} (in {command!r})"


def test_documented_commands_name_known_jobs_and_the_flags_they_need() -> None:
    commands = _documented_commands()
    assert len(commands) >= 8, commands
    for command in commands:
        check_command(command)


@pytest.mark.parametrize(("command", "message"), [
    ("python -m jobs.no_such_job --input s3://a --run s3://b", "unknown job"),
    ("python -m jobs.query --run s3://b", "jobs.query needs ['--input']"),
    ("python -m jobs.graph --run s3://b --colour red", "jobs.graph has no ['--colour']"),
])
def test_the_command_check_fails_for_bad_commands(command: str, message: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_command(command)


def test_every_job_prints_its_help() -> None:
    for job in cli.JOBS:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            cli.run_job(job, ["--help"])
        assert exited.value.code == 0 and "--run" in out.getvalue(), job


def test_nightly_reindex_runs_at_two_utc() -> None:
    spec = BY_KIND["RayCronJob"]["spec"]
    assert spec["schedule"].split() == ["0", "2", "*", "*", "*"]
    assert spec["timeZone"] in ("UTC", "Etc/UTC")
    assert not spec.get("suspend", False)
    # A run must end before the next one starts: RayCronJob v1.7 has no concurrency policy.
    assert 0 < spec["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600


# ----------------------------------------------------------------------------------------------
# Ray cluster launcher config and runtime env


def test_ray_cluster_launcher_config() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "max_workers", "head_node_type", "available_node_types", "docker",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in config, f"cluster/ray-cluster.yaml has no {key}"
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before it contacts AWS
    validate_config(prepared)  # Ray's own ray-schema.json and its cross-field checks
    types = prepared["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in types.values()), "no GPU node type"
    ray_version = _cluster(BY_KIND["RayCluster"])["rayVersion"]
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray_version}-py311")


def test_runtime_env_validates_and_lists_the_project_dependencies(monkeypatch: pytest.MonkeyPatch) -> None:
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    monkeypatch.chdir(REPO)  # working_dir "." is where `ray job submit` runs
    parsed = RuntimeEnv(**env)  # Ray's own validation of every field
    assert parsed["working_dir"] == "." and "NUMBA_CACHE_DIR" in env["env_vars"]
    assert "OMP_NUM_THREADS" not in env["env_vars"]
    assert {".git/", ".venv/"} <= set(env["excludes"])
    wanted = {canonicalize_name(r.name): str(r.specifier) for r in map(
        Requirement, tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])}
    wanted.pop(canonicalize_name("ray"))  # the cluster's own Ray
    listed = {canonicalize_name(r.name): str(r.specifier) for r in map(Requirement, parsed["pip"]["packages"])}
    assert {k: v for k, v in listed.items() if k in wanted} == wanted
    assert set(listed) - set(wanted) <= {"s3fs", "gcsfs"}, "runtime_env.yaml installs packages gatrep does not need"
