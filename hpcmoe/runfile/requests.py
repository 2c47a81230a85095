"""The /requests rows of the run file: rank 0 follows every live request through the steps' events,
writes each as it ends (flushed), carries over what a resumed run's stopped one finished, and at the
end lays the per-request arrays out in file order. RunWriter's base class: requests end one by one,
while steps arrive in blocks, so they are kept apart from the writer's step buffers.
"""

from __future__ import annotations

import numpy as np

from hpcmoe.runfile.schema import REQUEST_FIELDS, open_request_arrays, open_requests_group


def append(dataset, dtype, start: int, values: list) -> None:
    """Append rows to a 1-d resizable dataset of `dtype` holding `start` rows, through h5py's
    low-level write (the high-level one costs ten times as much per call, and turns variable-length
    rows of equal length into a 2-d array that it then refuses)."""
    from h5py import h5s, h5t

    count = len(values)
    dataset.resize((start + count,))
    column = np.empty(count, dtype=dtype)
    for k, value in enumerate(values):
        column[k] = value
    selection = dataset.id.get_space()
    selection.select_hyperslab((start,), (count,))
    dataset.id.write(h5s.create_simple((count,)), selection, column, mtype=h5t.py_create(dtype))


class RequestRows:
    """The requests' part of RunWriter. Needs from it: self.file, self.requests (the run's requests:
    len, [i], prompt_lengths), self.checkpoint, self.width (the most tokens a request may make), self.steps
    and self.write (the buffered steps)."""

    def open_requests(self) -> None:
        """The empty /requests group, and nothing followed yet."""
        self.columns = open_requests_group(self.file)
        self.ended = 0
        self.finished = np.zeros(len(self.requests), bool)
        self.live: dict[int, dict] = {}  # request index -> its tokens (and logits) and times so far
        self.saves_logits = "logits" in self.file
        self.resumed: dict[int, list[int]] = {}  # a resumed run: the tokens its stopped requests had made

    def take_tokens(self, step: int, events: list, logits: list, started_at: float, held_at: float) -> None:
        """The step's events of every rank (hpcmoe.runtime.batch.Events) and, with output.save_logits, the
        logits of each token made ([tokens, vocab] per rank): rank 0 follows every live request and
        writes the ones that ended (flushed: on disk even if the job is killed next)."""
        ended = []
        for rank_events, rank_logits in zip(events, logits):
            for index in rank_events.admitted:
                if index not in self.live:  # (after a recovery a live request joins again: kept as it was)
                    tokens = list(self.resumed.get(index, []))
                    self.live[index] = {
                        "tokens": tokens,
                        "admitted_at": started_at,
                        "admitted_step": step,
                        "first_token_at": float("nan"),
                        "logits": [],
                        "logits_from": len(tokens),
                    }
            for k, (index, token, reason) in enumerate(
                zip(rank_events.index.tolist(), rank_events.token.tolist(), rank_events.reason)
            ):
                live = self.live[index]
                if rank_logits is not None and self.saves_logits:  # written with the request, in one block
                    live["logits"].append(rank_logits[k])
                live["tokens"].append(token)
                if live["first_token_at"] != live["first_token_at"]:  # NaN: this is its first new token
                    live["first_token_at"] = held_at
                if reason:
                    ended.append((index, reason))
        if ended:
            self.write_ended(
                [(index, reason, self.live.pop(index)) for index, reason in ended], step, held_at
            )

    def write_ended(self, ended: list, step: int, held_at: float) -> None:
        """Append rows to /requests: (request index, finish reason, its live record) each."""
        from hpcmoe.workload import decode

        columns = {name: [] for name in REQUEST_FIELDS}
        for index, reason, live in ended:
            request = self.requests[index]
            if live["logits"]:  # one write per request: a write per token cost 0.1 ms each (h5py)
                first = live["logits_from"]
                self.file["logits"][index, first : first + len(live["logits"])] = np.stack(live["logits"])
            admitted = live["admitted_at"]
            text = decode(self.checkpoint, live["tokens"])
            row = {
                "index": index,
                "id": request.id,
                "finish_reason": reason.encode(),
                "prompt_ids": np.array(request.prompt_ids, np.int64),
                "prompt_text": np.frombuffer((request.prompt or "").encode(), np.uint8),
                "completion_ids": np.array(live["tokens"], np.int64),
                "text": np.frombuffer((text or "").encode(), np.uint8),
                "admitted_at": admitted,
                "first_token_at": live["first_token_at"],
                "finished_at": held_at,
                "ttft_s": live["first_token_at"] - admitted,
                "tokens_per_s": len(live["tokens"]) / max(held_at - admitted, 1e-9),
                "admitted_step": live["admitted_step"],
                "finished_step": step,
            }
            for name, value in row.items():
                columns[name].append(value)
            self.finished[index] = reason != "stop"
        for name, values in columns.items():
            append(*self.columns[name], self.ended, values)
        self.ended += len(ended)
        self.file.flush()

    def stop_live(self, step: int, held_at: float) -> None:
        """A stopped run: every live request is written with finish reason `stop` (to continue)."""
        if self.live:
            self.write_ended(
                [(index, "stop", self.live.pop(index)) for index in sorted(self.live)], step, held_at
            )

    def done(self):
        """What this run has done so far (hpcmoe.workload.Done): to share after a recovery."""
        from hpcmoe.workload import Done

        return Done(self.finished.copy(), {index: list(live["tokens"]) for index, live in self.live.items()})

    def write_finished_steps(self, resume) -> None:
        """A resumed run's file starts with what the stopped run wrote: its steps' statistics, its
        finished requests (and their logits); its stopped requests go on from their tokens."""
        import h5py

        k = resume.step
        for name, values in (("routing", resume.routing), ("traffic", resume.traffic)):
            self.file[name].resize(k, axis=0)
            self.file[name][:k] = values
        self.steps = k
        self.resumed = resume.done.partial
        with h5py.File(resume.path, "r", locking=False) as old:
            rows = old["requests"]
            keep = np.flatnonzero(rows["finish_reason"][:] != b"stop")
            for name in REQUEST_FIELDS:
                append(*self.columns[name], 0, list(rows[name][:][keep]))
            self.ended = len(keep)
            if "logits" in old and "logits" in self.file:
                for index in sorted(set(rows["index"][:].tolist())):
                    self.file["logits"][index] = old["logits"][index]
        self.finished[:] = resume.done.finished

    def write_requests(self, config) -> None:
        """The per-request arrays in file order, from /requests (requests that never started: -1
        tokens, no text): /request_ids, /prompt_ids, /prompt_lengths, /generated [request, new_token]
        (-1 padded), /generated_lengths and, with a tokenizer, /generated_text (UTF-8; a NUL
        character appears as U+2400, the exact bytes are in /requests/text)."""
        self.write()
        rows = self.file["requests"]
        order = np.argsort(rows["index"][:], kind="stable")
        where = dict(zip(rows["index"][:][order].tolist(), order.tolist()))
        from hpcmoe.workload import tokenizer_path

        has_text = tokenizer_path(self.checkpoint) is not None
        arrays = open_request_arrays(
            self.file, len(self.requests), self.requests.prompt_lengths, self.width, has_text
        )
        made, replaced = (rows["completion_ids"][:], rows["text"][:]), 0
        for start in range(0, len(self.requests), 4096):  # in blocks: a million requests stay within memory
            block = range(start, min(len(self.requests), start + 4096))
            replaced += self.write_request_block(block, arrays, made, where)
        texts = arrays[-1]
        if texts is not None:
            texts.attrs.update(
                {"nul_shown_as": "U+2400", "nul_characters": replaced, "exact": "/requests/text"}
            )

    def write_request_block(self, block: range, arrays: tuple, made: tuple, where: dict) -> int:
        """Requests `block` of the arrays of open_request_arrays, from /requests' completion_ids and
        text (`made`, read whole; `where`: request index -> its row) -> the NULs shown as U+2400."""
        ids, prompts, generated, lengths, texts = arrays
        longest = prompts.shape[1]
        (completions, encoded), replaced = made, 0
        tokens_made = np.full((len(block), self.width), -1, np.int64)
        prompt = np.full((len(block), longest), -1, np.int64)
        names, words = [], []
        for j, i in enumerate(block):
            request = self.requests[i]
            names.append(request.id)
            prompt[j, : len(request.prompt_ids)] = request.prompt_ids
            text = ""
            if i in where:
                tokens = completions[where[i]]
                tokens_made[j, : len(tokens)] = tokens
                text = bytes(encoded[where[i]]).decode("utf-8", "replace")
            replaced += text.count("\0")
            words.append(text.replace("\0", "\u2400"))
        ids[block.start : block.stop] = names
        prompts[block.start : block.stop] = prompt
        generated[block.start : block.stop] = tokens_made
        lengths[block.start : block.stop] = (tokens_made >= 0).sum(1)
        if texts is not None:
            texts[block.start : block.stop] = words
        return replaced
