"""`python -m chorus_learner`: Chorus' `Learner` service on PyTorch.

Starts from an HF checkpoint (`--model DIR`) or a learner checkpoint of this package
(`--resume DIR`), serves `Learner` on `--listen` (TLS with `--tls-cert`/`--tls-key`, mutual with
`--tls-ca`), prints `listening on http://HOST:PORT` (`https://`) once it
serves, and, with `--orchestrator URL`, registers there and sends heartbeats like Chorus' own
learner. `chorus run` starts it for `[learner] backend = "torch"`.

Under `torchrun --nproc-per-node N -m chorus_learner ...` it trains over N processes with
FSDP2 (parameters, gradients and optimizer state sharded; gloo on CPUs, NCCL on GPUs): rank 0
serves and publishes, the others follow its steps.

Examples:
  python -m chorus_learner --model runs/base --run-id demo --token T --listen 0.0.0.0:7000
  torchrun --nproc-per-node 8 -m chorus_learner --model /models/nano --run-id demo --token T
  python -m chorus_learner --resume runs/demo/torch-learner/step-00000040 --run-id demo --token T
"""

import argparse
import logging
import os
import sys
import threading
import time

import grpc
import torch

from .objective import Objective
from .service import LearnerState, load_reports, serve
from .tls import Tls
from .tls import add_arguments as add_tls_arguments
from .trainer import DEFAULT_MICRO_BATCH_TOKENS, Trainer, load_model


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m chorus_learner", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--model", help="HF checkpoint directory to start training from")
    start.add_argument("--resume", help="learner checkpoint (weights, optimizer, counters) to continue")
    p.add_argument("--run-id", required=True, help="the run this learner trains")
    p.add_argument("--token", default=os.environ.get("CHORUS_TOKEN"),
                   help="the run's shared token (callers must send it); default $CHORUS_TOKEN")
    p.add_argument("--listen", default="127.0.0.1:0", help="address to serve on; port 0 picks one")
    p.add_argument("--advertise", help="host others reach this learner at (default: the listen host)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="learning rate of groups that carry none (default 1e-3)")
    p.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="clip the global gradient norm to this (0: no clipping; default 1)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--algorithm", default="grpo",
                   help="objective of RL groups that name none (grpo, dapo, dr_grpo, gspo, cispo, reinforce)")
    p.add_argument("--groups-per-step", type=int, default=1,
                   help="groups per optimizer step for groups that do not say (default 1)")
    p.add_argument("--keep-versions", type=int, default=4,
                   help="newest versions kept for exact requests (default 4)")
    p.add_argument("--max-chunk-bytes", type=int, default=1 << 20, help="weight chunk size")
    p.add_argument("--checkpoints", help="directory for learner checkpoints (stage boundaries, --checkpoint-every)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="also save every this many versions (0: stage boundaries only)")
    p.add_argument("--orchestrator", help="register with the orchestrator at this URL and send heartbeats")
    p.add_argument("--id", default="learner", help="this learner's id at the orchestrator")
    p.add_argument("--micro-batch-tokens", type=int, default=DEFAULT_MICRO_BATCH_TOKENS,
                   help="most padded tokens (sequences times the longest) in one forward and "
                        "backward pass; larger steps run in several, with the same gradient "
                        f"(default {DEFAULT_MICRO_BATCH_TOKENS})")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="torch seed")
    add_tls_arguments(p)
    return p.parse_args(argv)


def register(args, endpoint, state, tls):
    from ._proto import orchestrator_pb2, orchestrator_pb2_grpc
    stub = orchestrator_pb2_grpc.OrchestratorStub(tls.channel(args.orchestrator))
    metadata = [("authorization", f"Bearer {args.token}")]
    reply = stub.RegisterLearner(orchestrator_pb2.RegisterLearnerRequest(
        learner_id=args.id, endpoint=endpoint, run_id=args.run_id,
        policy_version=state.trainer.version, devices=1), metadata=metadata)
    interval = max(reply.heartbeat_interval_ms, 100) / 1000

    def beat():
        sequence = 0
        while True:
            time.sleep(interval)
            sequence += 1
            try:
                r = stub.LearnerHeartbeat(orchestrator_pb2.LearnerHeartbeatRequest(
                    learner_id=args.id, sequence=sequence, run_id=args.run_id,
                    step=state.trainer.step, policy_version=state.newest().version,
                    queued_groups=state.work.qsize()), metadata=metadata)
                if not r.registered:
                    stub.RegisterLearner(orchestrator_pb2.RegisterLearnerRequest(
                        learner_id=args.id, endpoint=endpoint, run_id=args.run_id,
                        policy_version=state.trainer.version, devices=1), metadata=metadata)
            except grpc.RpcError as e:
                logging.warning("heartbeat to %s failed: %s", args.orchestrator, e.details())

    threading.Thread(target=beat, name="heartbeats", daemon=True).start()


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.token:
        sys.exit("give the run's token: --token T or CHORUS_TOKEN=T")
    if args.micro_batch_tokens < 1:
        sys.exit(f"--micro-batch-tokens must be at least 1, not {args.micro_batch_tokens}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    objective = Objective.for_algorithm(args.algorithm)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return main_distributed(args, objective)
    if args.resume:
        trainer = Trainer.resume(args.resume, objective=objective,
                                 micro_batch_tokens=args.micro_batch_tokens)
    else:
        trainer = Trainer(load_model(args.model), lr=args.lr, max_grad_norm=args.max_grad_norm,
                          objective=objective, weight_decay=args.weight_decay,
                          micro_batch_tokens=args.micro_batch_tokens)
    return serve_until_stopped(args, trainer, trainer)


def exit_with_parent():
    """Ends this rank when torchrun, its parent, is gone (killed with the run that started it)."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main_distributed(args, objective):
    import torch.distributed as dist
    from .distributed import Leader, follow
    exit_with_parent()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if args.resume:
        sys.exit("--resume is not supported under torchrun yet (sharded checkpoints hold no "
                 "optimizer state); start from the checkpoint's weights with --model")
    trainer = Trainer(load_model(args.model), lr=args.lr, max_grad_norm=args.max_grad_norm,
                      objective=objective, weight_decay=args.weight_decay, shard=True,
                      micro_batch_tokens=args.micro_batch_tokens)
    if dist.get_rank() != 0:
        follow(trainer)
        return 0
    logging.info("training over %d processes (FSDP2, %s)", dist.get_world_size(), backend)
    return serve_until_stopped(args, Leader(trainer), trainer)


def serve_until_stopped(args, trainer, local_trainer):
    # A resumed learner replays the step reports saved with its checkpoint.
    replay = load_reports(args.resume) if getattr(args, "resume", None) else []
    state = LearnerState(trainer, args.run_id, groups_per_step=args.groups_per_step,
                         keep_versions=args.keep_versions, max_chunk_bytes=args.max_chunk_bytes,
                         checkpoints=args.checkpoints, checkpoint_every=args.checkpoint_every,
                         replay=replay)
    tls = Tls(args)
    server, port = serve(state, args.listen, args.token, tls=tls)
    host = args.advertise or args.listen.rsplit(":", 1)[0]
    if host in ("0.0.0.0", "[::]"):
        import socket
        host = socket.gethostname()
    endpoint = f"{tls.scheme}://{host}:{port}"
    logging.info("learner of run %s at version %d serving at %s", args.run_id, local_trainer.version, endpoint)
    if args.orchestrator:
        register(args, endpoint, state, tls)
    print(f"listening on {endpoint}", flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(grace=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
