"""The ranks' links and collectives: how the Simulation's messages travel and its non-blocking
collectives complete.

Each rank's outgoing links are queues (latency + bytes / bandwidth, one message after another, as
link.Link), and so is each receiving end (many senders into one rank, or one shared network card,
take their turns); a GPU whose MPI cannot read device memory stages through the host; the emulated
parallel.link queues at the sender. A collective moves on only when its members call into MPI.
Separate from the event loop (hpcmoe.sim.simulate) and the ranks' cores (hpcmoe.sim.cores): this is
the network the ranks' stand-ins for MPI (hpcmoe.sim.net) post to.
"""

from __future__ import annotations

import numpy as np

from hpcmoe.sim.events import Collective, Cond, Driver, Mail, poll_time, queue


class Links:
    """The network half of a Simulation (a mixin): it keeps the ports and when each is free, the
    mail of each exchange and the collectives in flight, and uses the Simulation's clock (now), its
    drivers and notify."""

    def set_up_links(self) -> None:
        ranks, machine = self.ranks, self.machine
        # the queues messages take, out of and into each rank: its own inside a node; across nodes
        # its node's network card, one per rank unless the machine file has inter_node.nics_per_node
        self.ports = {"intra": np.arange(ranks), "inter": np.arange(ranks)}
        if machine.nics_per_node:
            index_on_host = np.zeros(ranks, np.int64)
            for host in set(self.host_of_rank):
                on_host = np.flatnonzero(self.hosts == host)
                index_on_host[on_host] = np.arange(len(on_host))
            self.ports["inter"] = self.hosts * machine.nics_per_node + index_on_host % machine.nics_per_node
        self.free_out = {link: np.zeros(int(ports.max()) + 1) for link, ports in self.ports.items()}
        self.free_in = {link: np.zeros(int(ports.max()) + 1) for link, ports in self.ports.items()}
        # parallel.link: each rank's own, queued at the sender only
        self.free_out["emulated"] = np.zeros(ranks)
        self.mails: dict = {}
        self.collectives: dict = {}
        self.awaiting_progress: dict = {}  # rank -> collectives waiting for its next MPI call

    def mail(self, key) -> Mail:
        if key not in self.mails:
            self.mails[key] = Mail(self.ranks)
        return self.mails[key]

    def send(self, key, src: int, dsts, nbytes, sent) -> None:
        """Post messages src -> dsts (ascending, as the engine posts them) of nbytes each, left at
        `sent` (scalar or per message): delivered after the physical link (intra or inter node), the
        emulated parallel.link when it separates the two, and staging through host memory on a GPU
        whose MPI cannot read device memory."""
        dsts = np.asarray(dsts, np.int64)
        if not len(dsts):
            return
        nbytes = np.broadcast_to(np.asarray(nbytes, float), dsts.shape)
        sent = np.broadcast_to(np.asarray(sent, float), dsts.shape).astype(float)
        m, p = self.machine, self.config.parallel
        delivered = np.empty(len(dsts))
        same_host = self.hosts[dsts] == self.hosts[src]
        for link, mask in (("intra", same_host), ("inter", ~same_host)):
            if mask.any():
                latency, bandwidth = m.intra if link == "intra" else m.inter
                durations, port = nbytes[mask] / bandwidth, self.ports[link][src]
                ends, self.free_out[link][port] = queue(self.free_out[link][port], sent[mask], durations)
                # the receiving end takes one message at a time too: many senders into one rank (or
                # one shared card) queue there, after the last byte has left its sender
                into, free_in = self.ports[link][dsts[mask]], self.free_in[link]
                if len(np.unique(into)) == len(into):
                    got = np.maximum(ends, free_in[into] + durations)
                    free_in[into] = got
                else:  # ranks of one node behind one card: one after another
                    got = np.empty(len(into))
                    for i, (card, end, duration) in enumerate(zip(into, ends, durations)):
                        free_in[card] = got[i] = max(end, free_in[card] + duration)
                delivered[mask] = got + latency
        if m.device == "cuda" and p.cuda_aware_mpi is False:
            delivered += 2 * nbytes / m.host_link_bytes_per_s
        emulated = (self.nodes[dsts] != self.nodes[src]) & (p.link is not None)
        if emulated.any():  # link.Link: stamped when posted, queued behind this rank's earlier messages
            ends, self.free_out["emulated"][src] = queue(
                self.free_out["emulated"][src],
                sent[emulated],
                nbytes[emulated] * 8 / (p.link.bandwidth_gbps * 1e9),
            )
            delivered[emulated] = np.maximum(delivered[emulated], ends + p.link.latency_us * 1e-6)
        box = self.mail(key)
        box.times[src, dsts] = delivered
        box.got[dsts] += 1
        if box.watchers:
            self.notify(
                {rank for d in dsts[np.isin(dsts, list(box.watchers))].tolist() for rank in box.watchers[d]}
            )

    def collective(self, key, members, rank: int, polled: bool = False) -> Cond:
        """This rank posts a non-blocking collective among `members` now; -> when it completes here.

        MPI moves a collective on only inside MPI calls: after the last member posts, every other
        member must make progress once (its next test: a pass of its scheduler, or a poll while it
        waits); a member's part completes a latency after all the *others* have, and it sees that at
        its own next test. (Measured here: a member that posts last and computes right away keeps the
        others waiting until it next tests, up to a millisecond and more.)"""
        entry = self.joining(key, members)
        entry.posted.add(rank)
        if len(entry.posted) == len(entry.members):
            entry.progress[rank] = self.now
            for member in entry.members:
                driver = self.drivers[member]
                if member == rank:
                    continue
                if driver.waiting is not None:  # asleep in wait_until: its next poll
                    # (at once where it spins, or yields)
                    spins = self.config.parallel.wait == "spin" or (polled and self.poll_by_yielding)
                    entry.progress[member] = (
                        self.now
                        if spins
                        else poll_time(driver.idle_since, self.now, self.machine.sleep_overshoot_s)
                    )
                else:
                    self.awaiting_progress.setdefault(member, []).append(entry)
            self.complete(entry)
        return entry.conds[rank]

    def joining(self, key, members) -> Collective:
        """The collective `key` among `members` (made by the first to ask)."""
        if key not in self.collectives:
            self.collectives[key] = Collective(tuple(members), {m: Cond() for m in members})
        return self.collectives[key]

    def progressed(self, driver: Driver) -> None:
        """The rank calls into MPI now (a scheduler pass, or the first test of a wait)."""
        for entry in self.awaiting_progress.pop(driver.rank, []):
            entry.progress[driver.rank] = self.now
            self.complete(entry)

    def complete(self, entry: Collective) -> None:
        if len(entry.progress) < len(entry.members):
            return
        order = sorted(entry.progress.values())
        latency = self.machine.collective_seconds(len(entry.members))
        for member, cond in entry.conds.items():
            others = (
                order[-1]
                if entry.progress[member] != order[-1]
                else order[-2]
                if len(order) > 1
                else order[-1]
            )
            cond.time = others + latency
            self.notify(cond.watchers)

    def forget(self, step: int) -> None:
        """Mail and collectives of steps long done (no rank is more than a step behind another)."""
        for table in (self.mails, self.collectives):
            for key in [k for k in table if k[1] < step - 2]:
                del table[key]
