"""The Ray session a command runs in: starting or joining Ray, quieting Ray Data, and the actor pool
settings of the model-running Ray Data stages (scoring, evaluation).
"""

from __future__ import annotations

import logging
import os
import socket

import ray

from pocl_ray.config import ConfigError


def _live_head() -> str | None:
    """The address of a head `ray start` left on this machine, if its GCS still answers.

    Ray records the head's address in `ray_current_cluster` under its temp folder and keeps it when
    the head dies without `ray stop`; a plain `ray.init(num_cpus=...)` then tries to join that
    address and fails. A TCP connect to the GCS port tells a live head from a stale file.
    """
    from ray._private.utils import read_ray_address  # the file Ray itself reads; no public API

    address = read_ray_address()
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return address
    except (OSError, ValueError):
        return None


def init_ray(num_cpus: int | None = None, *, min_cpus: int = 1, include_dashboard: bool | None = None) -> bool:
    """Join a live cluster, else start a local Ray instance; returns True if this call started Ray.

    A live cluster is RAY_ADDRESS (as inside `ray job submit`; RAY_ADDRESS=local asks for a local
    instance) or a head `ray start` runs on this machine. Otherwise the local instance advertises
    num_cpus logical CPUs (default: all cores, at least min_cpus, so Ray Data read tasks, measurer
    actors, train workers and Tune trial drivers fit together even on 2 cores). Says in one line
    which it did.
    """
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":  # "local" asks Ray for a fresh instance, as below
        _join(None, f"the cluster at RAY_ADDRESS={address}")
        return False
    head = None if address else _live_head()
    if head:
        _join(head, f"the running Ray head at {head}")
        return False
    cpus = num_cpus or max(min_cpus, os.cpu_count() or 1)
    # address="local": a stale head address left on disk must not be joined.
    ray.init(address="local", num_cpus=cpus, include_dashboard=include_dashboard)
    print(f"[ray] started a local Ray instance with {cpus} logical CPUs", flush=True)
    return True


def _join(address: str | None, cluster: str) -> None:
    """ray.init on a running cluster (None: RAY_ADDRESS's); a head that wants a token this process
    lacks is a clear error instead of Ray's nested GCS traceback."""
    try:
        ray.init(address=address)
    except Exception as err:
        if not _token_refused(err):
            raise
        raise ConfigError(
            f"{cluster} requires Ray's token authentication and this process has no token: export "
            "RAY_AUTH_MODE=token, with the head's token in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or "
            "RAY_AUTH_TOKEN (`ray get-auth-token` on the head prints it)"
        ) from None
    print(f"[ray] joined {cluster}", flush=True)


def _token_refused(err: BaseException | None) -> bool:
    from ray.exceptions import AuthenticationError

    while err is not None:  # Ray wraps the refusal in a ConnectionError over a RuntimeError
        if isinstance(err, AuthenticationError) or "InvalidAuthToken" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def quiet_ray_data(verbose: bool = False) -> None:
    """Ray Data's progress display off (unless verbose) in this driver's DataContext.

    In a non-interactive log (`ray job submit`, a file) Ray Data dumps a block of lines per operator
    every 10 s and two plan lines per execution; our stages print one progress line instead
    (`row_progress`). Its one-time hint that progress bars are off is silenced with it.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO if verbose else logging.ERROR)


def actor_pool(num_actors: int | str):
    """Ray Data's compute strategy for a model actor pool: a fixed size, or for "auto" a pool that
    starts with one actor and grows while there is work and free resources for another (on an
    autoscaling cluster, GPU nodes that join are used as they come)."""
    import ray.data

    if num_actors == "auto":
        return ray.data.ActorPoolStrategy(min_size=1, max_size=None)
    return ray.data.ActorPoolStrategy(size=int(num_actors))


def actor_resources(num_cpus: float, num_gpus: float) -> dict[str, float]:
    """map_batches resource arguments of one model actor.

    Ray Data reserves 1 CPU for a GPU actor given no num_cpus, and warns ("experimental") when both
    are given; so with a GPU, num_cpus is passed only when it is not that 1.
    """
    if num_gpus > 0:
        return {"num_gpus": num_gpus} | ({"num_cpus": num_cpus} if num_cpus != 1 else {})
    return {"num_cpus": num_cpus}
