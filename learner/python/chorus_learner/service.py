"""The `Learner` gRPC service (`proto/chorus/v1/learner.proto`) over a PyTorch `Trainer`, with
the semantics of Chorus' own learner service (`learner/src/service.rs`): groups acknowledged by
id (a group seen before is acknowledged again, not trained twice), a step once
`step_groups` groups are held (trained in group-id order; groups naming the same objective
train together), empty groups complete their step, every step (skipped or not) publishes the
next version as checksummed chunks, the newest `keep_versions` kept to stream exactly, and a
report per step to `StreamSteps`."""

import logging
import os
import queue
import struct
import threading
import time

import grpc

from ._proto import learner_pb2, learner_pb2_grpc
from .objective import Objective
from .trainer import BatchError, RlSequence, SftSequence, StepReport
from .weights import encode

# Most steps ahead of its version a group's `step` may be (chorus_proto::limits::MAX_STEPS_AHEAD).
MAX_STEPS_AHEAD = 1024

log = logging.getLogger("chorus_learner")


def completion_mask(t):
    n = len(t.completion_token_ids)
    m = len(t.completion_mask)
    if m == 0:
        return None
    if m != n:
        raise BatchError(
            f"trajectory {t.trajectory_id}: {n} completion tokens but a completion mask of {m}")
    if not any(t.completion_mask):
        raise BatchError(f"trajectory {t.trajectory_id}: the completion mask selects no token")
    return list(t.completion_mask)


def group_sft(g):
    out = []
    for t in g.trajectories:
        if not t.prompt_token_ids or not t.completion_token_ids:
            raise BatchError(f"trajectory {t.trajectory_id} needs prompt and completion tokens")
        out.append(SftSequence(tokens=list(t.prompt_token_ids) + list(t.completion_token_ids),
                               prompt_len=len(t.prompt_token_ids), loss_mask=completion_mask(t)))
    return out


def group_sequences(g):
    out = []
    for t in g.trajectories:
        n = len(t.completion_token_ids)
        if not t.prompt_token_ids or n == 0:
            raise BatchError(f"trajectory {t.trajectory_id} needs prompt and completion tokens")
        if len(t.logprobs) != n or len(t.policy_versions) != n:
            raise BatchError(f"trajectory {t.trajectory_id}: {n} tokens but {len(t.logprobs)} "
                             f"logprobs and {len(t.policy_versions)} versions")
        if t.advantage != t.advantage or abs(t.advantage) == float("inf"):
            raise BatchError(f"trajectory {t.trajectory_id}: advantage is not finite")
        out.append(RlSequence(tokens=list(t.prompt_token_ids) + list(t.completion_token_ids),
                              prompt_len=len(t.prompt_token_ids),
                              behaviour_logprobs=list(t.logprobs), advantage=t.advantage,
                              loss_mask=completion_mask(t)))
    return out


def group_objective(g):
    if not g.HasField("objective"):
        return None
    try:
        return Objective.from_proto(g.objective)
    except ValueError as e:
        raise BatchError(f"objective: {e}") from e


class Published:
    def __init__(self, version, chunks):
        self.version = version
        self.chunks = chunks


class LearnerState:
    """The training thread and what it publishes."""

    def __init__(self, trainer, run_id, groups_per_step=1, keep_versions=4,
                 max_chunk_bytes=1 << 20, checkpoints=None, checkpoint_every=0,
                 unsupported=(), replay=()):
        self.trainer = trainer
        self.run_id = run_id
        self.groups_per_step = max(groups_per_step, 1)
        self.keep = max(keep_versions, 1)
        self.max_chunk_bytes = max_chunk_bytes
        self.checkpoints = checkpoints
        self.checkpoint_every = checkpoint_every
        self.cond = threading.Condition()
        self.recent = []
        # Step reports; a learner resumed from a checkpoint starts with those saved there
        # (`replay`), which a learner killed right after saving may never have sent.
        self.history = list(replay)
        self.seen = set()
        # The newest version saved in a checkpoint (a restart resumes from it), or None.
        self.checkpointed = None
        # Weight transfers served since the last step report, which carries them on.
        self.transfers = []
        self.work = queue.Queue()
        self.start_version = trainer.version
        self._publish()
        threading.Thread(target=self._train, name="chorus-learner", daemon=True).start()

    # -- what the service reads -------------------------------------------------------------

    def newest(self):
        with self.cond:
            return self.recent[-1]

    def wait_for(self, version, exact, alive):
        with self.cond:
            while self.recent[-1].version < version and alive():
                self.cond.wait(timeout=1.0)
            if not exact:
                return self.recent[-1]
            return next((p for p in self.recent if p.version == version), None)

    def steps_after(self, step, alive):
        """Reports of the steps after `step`, waiting for the next one."""
        with self.cond:
            while alive():
                fresh = [r for r in self.history if r.step > step]
                if fresh:
                    return fresh
                self.cond.wait(timeout=1.0)
            return []

    def submit(self, g):
        """Queues `g`, or raises BatchError saying why it cannot be trained on."""
        if g.trajectories:
            if g.mtp_head:
                raise BatchError("the torch learner does not train MTP heads (mtp_heal stages)")
            group_sft(g) if g.supervised else group_sequences(g)
        group_objective(g)
        with self.cond:
            version = self.recent[-1].version
            if g.HasField("step") and g.step > version + MAX_STEPS_AHEAD:
                raise BatchError(
                    f"step is {g.step}, but this learner is at version {version} and holds "
                    f"groups at most {MAX_STEPS_AHEAD} steps ahead (a learner restarted from "
                    "an older checkpoint than the orchestrator kept groups for?)")
            # Trained into a version held already: sent again after a restart.
            if g.HasField("step") and g.step < version:
                return
            if g.group_id in self.seen:
                return
            self.seen.add(g.group_id)
        self.work.put(g)

    # -- the training thread ----------------------------------------------------------------

    def discard_pending(self):
        """Drops the groups held for steps not yet trained, once the step in training is done."""
        done = threading.Event()
        self.work.put(done)
        done.wait()

    def _publish(self):
        t = self.trainer
        p = Published(t.version, encode(self.run_id, t.version, t.tensors(), self.max_chunk_bytes))
        with self.cond:
            self.recent.append(p)
            del self.recent[:-self.keep]
            self.cond.notify_all()
        return p

    def _save(self, why, pending=None):
        """Saves a checkpoint with the step reports so far, and `pending` (this step's report,
        not yet sent) after them."""
        if not self.checkpoints:
            return
        path = os.path.join(self.checkpoints, f"step-{self.trainer.step:08}")
        os.makedirs(path, exist_ok=True)
        with self.cond:
            reports = self.history[-KEPT_REPORTS:]
        if pending is not None:
            reports.append(pending)
        # Before the trainer's state file, which marks the checkpoint complete.
        write_reports(path, reports)
        self.trainer.save(path)
        self.checkpointed = self.trainer.version
        log.info("learner checkpoint (%s) at version %d: %s", why, self.trainer.version, path)

    def _train(self):
        # Groups gathered by the step they name, so that groups sent again after a restart and
        # new ones never count towards each other's step.
        waiting, stage = {}, None
        while True:
            g = self.work.get()
            if isinstance(g, threading.Event):
                # A restarted orchestrator sends the untrained steps anew.
                dropped = sum(len(v) for v in waiting.values())
                waiting.clear()
                if dropped:
                    log.warning("dropped %d groups held for steps not yet trained", dropped)
                g.set()
                continue
            version = self.trainer.version
            step = g.step if g.HasField("step") else version
            if step < version:
                continue
            waiting.setdefault(step, []).append(g)
            # Every step whose groups are all here, in order: the groups of the next step may
            # have come while this one trained (groups sent again after a restart do).
            while True:
                ready = waiting.get(self.trainer.version)
                if not ready or len(ready) < (ready[0].step_groups or self.groups_per_step):
                    break
                groups = sorted(waiting.pop(self.trainer.version), key=lambda x: x.group_id)
                stage = self._step(groups, stage)

    def _step(self, groups, stage):
        """Trains one step on `groups` (all of one step), publishes and reports it; returns the
        stage it trained in."""
        if stage is not None and stage != groups[0].stage:
            self._save("stage boundary")
        stage = groups[0].stage
        lr = groups[0].learning_rate or None
        t = self.trainer
        t.set_router_frozen(any(x.router_frozen for x in groups))
        started = time.monotonic()
        try:
            if groups[0].supervised:
                batch = [s for x in groups for s in group_sft(x)]
                n, supervised = len(batch), True
                t.enter_stage(max(x.stage for x in groups), False)
                report = t.sft_step(batch, lr)
            else:
                parts = []
                for x in groups:
                    o = group_objective(x) or t.objective
                    seqs = group_sequences(x)
                    for part in parts:
                        if part[0] == o:
                            part[1].extend(seqs)
                            break
                    else:
                        parts.append((o, seqs))
                n, supervised = sum(len(s) for _, s in parts), False
                t.enter_stage(max(x.stage for x in groups), any(o.kl_coef > 0 for o, _ in parts))
                report = t.rl_step(parts, lr)
        except (BatchError, ValueError, RuntimeError) as e:
            t.skip_step()
            report = StepReport(step=t.step, version=t.version, skipped=str(e))
            supervised = groups[0].supervised
        published = self._publish()
        msg = learner_pb2.StepReport(
            run_id=self.run_id, step=report.step, policy_version=report.version,
            loss=report.loss, kl=report.kl, entropy=report.entropy,
            grad_norm=report.grad_norm, learning_rate=report.lr,
            clip_fraction=report.clip_fraction, tokens=report.tokens, trajectories=n,
            skip_reason=report.skipped or "",
            mean_abs_logprob_diff=report.mean_abs_logprob_diff, supervised=supervised,
            weights_digest=published.chunks[-1].digest if published.chunks else b"",
            weights_digest_algorithm=(published.chunks[-1].digest_algorithm
                                      if published.chunks else 0),
            weights_bytes=sum(len(c.data) for c in published.chunks),
            group_ids=[x.group_id for x in groups])
        with self.cond:
            msg.transfers.extend(self.transfers)
            self.transfers = []
        if self.checkpoint_every and report.version % self.checkpoint_every == 0:
            pending = learner_pb2.StepReport()
            pending.CopyFrom(msg)
            pending.checkpoint_version = report.version
            self._save("every", pending)
        if self.checkpointed is not None:
            msg.checkpoint_version = self.checkpointed
        with self.cond:
            self.history.append(msg)
            self.cond.notify_all()
        if report.skipped:
            log.warning("step %d skipped: %s", report.step, report.skipped)
        else:
            log.info("step %d -> version %d: loss %.4f, %d sequences, %.2f s", report.step,
                     report.version, report.loss, n, time.monotonic() - started)
        return stage


REPORTS_FILE = "step_reports.bin"
# As Chorus' learner: the newest reports only, enough for those in flight when it died.
KEPT_REPORTS = 256


def write_reports(directory, reports):
    """Each report as a little-endian u32 length and the encoded message (Chorus' format)."""
    with open(os.path.join(directory, REPORTS_FILE), "wb") as f:
        for r in reports[-KEPT_REPORTS:]:
            body = r.SerializeToString()
            f.write(struct.pack("<I", len(body)))
            f.write(body)


def load_reports(directory):
    """The step reports saved with the checkpoint in `directory` (none if it has no file)."""
    path = os.path.join(directory, REPORTS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    reports, at = [], 0
    while at < len(data):
        if at + 4 > len(data):
            raise ValueError(f"{path}: corrupt step reports ({len(data) - at} bytes left, a length takes 4)")
        (n,) = struct.unpack_from("<I", data, at)
        if at + 4 + n > len(data):
            raise ValueError(f"{path}: corrupt step reports (a report of {n} bytes, {len(data) - at - 4} left)")
        r = learner_pb2.StepReport()
        r.ParseFromString(data[at + 4:at + 4 + n])
        reports.append(r)
        at += 4 + n
    return reports


class LearnerServicer(learner_pb2_grpc.LearnerServicer):
    def __init__(self, state):
        self.state = state

    def SubmitTrajectories(self, request_iterator, context):
        resp = learner_pb2.SubmitTrajectoriesResponse()
        for g in request_iterator:
            if g.run_id and g.run_id != self.state.run_id:
                reason = f"this learner trains run `{self.state.run_id}`, not `{g.run_id}`"
                log.warning("group %s rejected: %s", g.group_id, reason)
                resp.rejected.add(group_id=g.group_id, reason=reason)
                continue
            try:
                self.state.submit(g)
                resp.accepted_group_ids.append(g.group_id)
            except BatchError as e:
                log.warning("group %s rejected: %s", g.group_id, e)
                resp.rejected.add(group_id=g.group_id, reason=str(e))
        return resp

    def StreamWeights(self, request, context):
        # Headers now: a client waits for them before it reads the stream, which may only
        # start once the version asked for is published.
        context.send_initial_metadata(())
        p = self.state.wait_for(request.policy_version, request.exact, context.is_active)
        if p is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"policy version {request.policy_version} is no longer kept (the "
                          f"learner keeps its newest {self.state.keep}); it is at version "
                          f"{self.state.newest().version}")
        # Timed as Chorus' learner times it: from the version being available to the last
        # chunk handed to the transport; a transfer cut off before is not recorded.
        started, sent = time.monotonic(), 0
        for c in p.chunks[request.start_chunk:]:
            sent += len(c.data)
            yield c
        done = learner_pb2.WeightTransfer(
            requester_id=request.requester_id, policy_version=p.version, bytes=sent,
            seconds=time.monotonic() - started, finished_at_ms=int(time.time() * 1000))
        with self.state.cond:
            self.state.transfers.append(done)

    def Status(self, request, context):
        if request.run_id and request.run_id != self.state.run_id:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"this learner trains run `{self.state.run_id}`, not `{request.run_id}`")
        if request.discard_pending:
            self.state.discard_pending()
        status = learner_pb2.LearnerStatus(run_id=self.state.run_id,
                                           policy_version=self.state.newest().version,
                                           start_version=self.state.start_version)
        if self.state.checkpointed is not None:
            status.checkpoint_version = self.state.checkpointed
        return status

    def StreamSteps(self, request, context):
        context.send_initial_metadata(())
        last = request.after_step
        while context.is_active():
            for r in self.state.steps_after(last, context.is_active):
                last = r.step
                yield r


class RequireToken(grpc.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>`, as Chorus' services do."""

    def __init__(self, token):
        self.expected = f"Bearer {token}"

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong authorization metadata (the run's token)")

        self.denied = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):
        metadata = dict(details.invocation_metadata)
        if metadata.get("authorization") != self.expected:
            handler = continuation(details)
            if handler is None:
                return None
            if handler.request_streaming and handler.response_streaming:
                return grpc.stream_stream_rpc_method_handler(lambda r, c: self.denied.unary_unary(None, c))
            if handler.request_streaming:
                return grpc.stream_unary_rpc_method_handler(lambda r, c: self.denied.unary_unary(None, c))
            if handler.response_streaming:
                return grpc.unary_stream_rpc_method_handler(lambda r, c: self.denied.unary_unary(None, c))
            return self.denied
        return continuation(details)


def serve(state, listen, token, max_workers=16, tls=None):
    """Serves the learner on `listen` (port 0 picks one), with TLS when `tls`
    (`chorus_learner.tls.Tls`) has an identity; returns the server and its port."""
    from concurrent import futures
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[RequireToken(token)],
        options=[("grpc.max_send_message_length", 64 << 20),
                 ("grpc.max_receive_message_length", 256 << 20)])
    learner_pb2_grpc.add_LearnerServicer_to_server(LearnerServicer(state), server)
    port = tls.add_port(server, listen) if tls is not None else server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot bind {listen}")
    server.start()
    return server, port
