"""Closed-form α-β-γ costs of allreduce, Horovod-style fusion into buckets, and bus bandwidth.

Notation (Thakur, Rabenseifner & Gropp 2005): α seconds of latency per message, β seconds per byte moved,
γ seconds per byte reduced (one add), n bytes per rank, p ranks. Ranks sit on ``nodes`` nodes with ``q``
ranks per node (p = nodes·q, placed contiguously), so a collective may use two links: the intra-node one
(α_i, β_i) and the inter-node one (α_e, β_e).

Every algorithm's cost is *affine in n*: ``t(n) = A + B·n``. More than that, it is *linear in the model
parameters*: ``t = a_i·α_i + a_e·α_e + b_i·β_i + b_e·β_e + c·γ`` with coefficients that depend only on
p, q and n. :func:`allreduce_terms` returns those coefficients (a design matrix row for least squares, the
way calibration fits α, β, γ); :func:`allreduce_time` evaluates them. All functions are vectorised: any
argument may be a numpy array and they broadcast.

Costs per algorithm (single link, q = 1, L = ⌈log2 p⌉):

- ring (reduce-scatter + allgather around a ring): ``2(p−1)α + 2(p−1)/p·nβ + (p−1)/p·nγ``
- recursive doubling (exchange the full vector L times): ``L(α + nβ + nγ)``
- Rabenseifner (recursive-halving reduce-scatter + recursive-doubling allgather):
  ``2Lα + 2(p−1)/p·nβ + (p−1)/p·nγ``
- binomial tree (reduce to a root, then broadcast): ``2L(α + nβ) + L·nγ``
- hierarchical (reduce to one leader per node by a binomial tree, ring allreduce among the ``nodes`` leaders,
  binomial broadcast inside the node), with ``l = ⌈log2 q⌉`` and m = nodes:
  ``2l(α_i + nβ_i) + l·nγ + 2(m−1)α_e + 2(m−1)/m·nβ_e + (m−1)/m·nγ``
- nccl (NCCL on GPU nodes: every rank works, none leads). Inside one node a ring over NVLink/NVSwitch (or
  PCIe): ``2(q−1)α_i + 2(q−1)/q·nβ_i``. Across nodes NCCL's rings visit every node, entering and leaving through
  its NICs, so a node's NICs together carry ``2(p−1)/p·n`` — what nccl-tests' busbw measures, and why a
  multi-node busbw never exceeds the node's NIC bandwidth (NVIDIA/nccl#412: ~24 GB/s across nodes on one
  HDR 200 Gb/s NIC, ~160 GB/s inside the node). The ring is pipelined and runs at its slowest edge, the NICs:
  ``2⌈log2 m⌉α_e + 2(q−1)α_i + 2(p−1)/p·nβ_e`` with β_e of the node's total NIC bandwidth (8 GPUs sharing one
  NIC get an eighth each; rail-optimised nodes have one per GPU). NCCL adds the received data inside the same
  pipelined copy kernels, so the reduction hides behind the link: no γ term (with one, 8 GB allreduces on HGX
  H100 nodes came out at 327 GB/s busbw against the 384 their NICs give). Latency: NCCL's double binary
  trees for small messages give ``2⌈log2 m⌉`` inter-node steps (plus the chain inside the node), growing with
  log2 of the nodes: what matters at thousands of GPUs with 16-64 images each, where every bucket pays α.
  (Letting the q GPUs' shards cross with ``2(m−1)/m·n`` bytes a node — half a ring's on two nodes — is faster
  than the NICs allow: ResNet-50 on 2-4 nodes of 8 V100 sharing one EDR NIC came out 13-37 % optimistic.)

How the flat algorithms use two links (m = nodes > 1):

- ring: every step waits for its slowest edge, an inter-node one, so all ``2(p−1)`` steps cost α_e and
  ``n/p·β_e`` (each NIC carries one ring flow per direction).
- recursive doubling: the first ``⌈log2 q⌉`` exchanges stay inside a node; the remaining ones cross nodes
  with all q ranks of a node sending n bytes through one NIC at once: ``α_e + q·nβ_e`` each.
- Rabenseifner: the inside-node halving steps move ``(q−1)/q·n`` in all, the across-node steps move
  ``(m−1)/(m·q)·n`` per rank, q ranks sharing the NIC: ``2l·α_i + 2(q−1)/q·nβ_i + 2⌈log2 m⌉α_e +
  2(m−1)/m·nβ_e + (p−1)/p·nγ``.
- binomial tree: inside-node levels on the intra link, the across-node levels only among the node roots.

Limits: p = 1 costs nothing; with α = γ = 0 the ring and Rabenseifner costs are the bandwidth-optimal
``2(p−1)/p·n·β``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

Algorithm = Literal["ring", "recursive_doubling", "rabenseifner", "binomial_tree", "hierarchical", "nccl"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)


@dataclass(frozen=True)
class LinkCost:
    """α (s per message), β (s per byte) of a link and γ (s per byte reduced), the model's parameters."""

    alpha_intra_s: float
    beta_intra_s_per_byte: float
    alpha_inter_s: float
    beta_inter_s_per_byte: float
    gamma_s_per_byte: float


@dataclass(frozen=True)
class CollectiveTerms:
    """Coefficients of the parameters in a collective's time (arrays broadcast to a common shape).

    ``time = alpha_intra·α_i + alpha_inter·α_e + beta_intra·β_i + beta_inter·β_e + gamma·γ``: counts of
    messages on each link and bytes moved on each link / reduced along the critical path.
    """

    alpha_intra: np.ndarray
    alpha_inter: np.ndarray
    beta_intra: np.ndarray
    beta_inter: np.ndarray
    gamma: np.ndarray

    def time(self, cost: LinkCost) -> np.ndarray:
        return (self.alpha_intra * cost.alpha_intra_s + self.alpha_inter * cost.alpha_inter_s
                + self.beta_intra * cost.beta_intra_s_per_byte + self.beta_inter * cost.beta_inter_s_per_byte
                + self.gamma * cost.gamma_s_per_byte)

    def latency_s(self, cost: LinkCost) -> np.ndarray:
        return self.alpha_intra * cost.alpha_intra_s + self.alpha_inter * cost.alpha_inter_s

    def matrix(self) -> np.ndarray:
        """Design matrix, columns (α_i, α_e, β_i, β_e, γ): for a least-squares fit of the parameters."""
        return np.stack(np.broadcast_arrays(self.alpha_intra, self.alpha_inter, self.beta_intra,
                                            self.beta_inter, self.gamma), axis=-1).astype(float)


def _ceil_log2(x: np.ndarray) -> np.ndarray:
    return np.ceil(np.log2(np.maximum(x, 1.0)))


def check_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown allreduce algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
    return algorithm


def allreduce_terms(algorithm: str, nbytes, nodes, ranks_per_node=1) -> CollectiveTerms:
    """Coefficients of α_i, α_e, β_i, β_e, γ in the time of an allreduce of ``nbytes`` per rank.

    ``nodes`` and ``ranks_per_node`` (q) are positive integers (arrays allowed). See the module docstring
    for the formulas.
    """
    check_algorithm(algorithm)
    n, m, q = np.broadcast_arrays(np.asarray(nbytes, dtype=float), np.asarray(nodes, dtype=float),
                                  np.asarray(ranks_per_node, dtype=float))
    if np.any(m < 1) or np.any(q < 1):
        raise ValueError("nodes and ranks_per_node must be >= 1")
    p = m * q
    multi = m > 1                     # does the collective cross nodes at all?
    zero = np.zeros_like(n)
    reduce_share = (p - 1) / p        # fraction of the vector each rank reduces in the bandwidth-optimal schemes
    if algorithm == "ring":
        steps = 2 * (p - 1)
        moved = 2 * (p - 1) / p * n
        return CollectiveTerms(alpha_intra=np.where(multi, 0.0, steps), alpha_inter=np.where(multi, steps, 0.0),
                               beta_intra=np.where(multi, 0.0, moved), beta_inter=np.where(multi, moved, 0.0),
                               gamma=reduce_share * n)
    lq = _ceil_log2(q)
    lp = _ceil_log2(p)
    l_inter = np.maximum(lp - lq, 0.0)          # exchanges that cross nodes
    if algorithm == "recursive_doubling":
        return CollectiveTerms(alpha_intra=lq, alpha_inter=l_inter, beta_intra=lq * n,
                               beta_inter=l_inter * q * n, gamma=lp * n)
    if algorithm == "rabenseifner":
        return CollectiveTerms(alpha_intra=2 * lq, alpha_inter=2 * l_inter,
                               beta_intra=2 * (q - 1) / q * n, beta_inter=2 * (m - 1) / m * n,
                               gamma=reduce_share * n)
    if algorithm == "binomial_tree":
        l_nodes = _ceil_log2(m)
        return CollectiveTerms(alpha_intra=2 * lq, alpha_inter=2 * l_nodes, beta_intra=2 * lq * n,
                               beta_inter=2 * l_nodes * n, gamma=(lq + l_nodes) * n)
    if algorithm == "nccl":
        l_nodes = _ceil_log2(m)
        # Across nodes NCCL's rings pass through every node: a node's NICs carry 2(p−1)/p·n, and the pipelined
        # ring runs at its slowest edge (the NICs), so the NVLink bytes do not add to the time. The reduction
        # runs inside the same pipelined copy kernels, hidden behind the link: no γ term.
        return CollectiveTerms(alpha_intra=2 * (q - 1), alpha_inter=2 * l_nodes,
                               beta_intra=np.where(multi, 0.0, 2 * (q - 1) / q * n),
                               beta_inter=np.where(multi, 2 * (p - 1) / p * n, 0.0), gamma=zero)
    # hierarchical: binomial reduce to the node leader, ring among leaders, binomial broadcast.
    return CollectiveTerms(alpha_intra=2 * lq, alpha_inter=2 * (m - 1), beta_intra=2 * lq * n,
                           beta_inter=2 * (m - 1) / m * n,
                           gamma=lq * n + (m - 1) / m * n + zero)


def allreduce_time(algorithm: str, nbytes, nodes, ranks_per_node, cost: LinkCost) -> np.ndarray:
    """Seconds for one allreduce of ``nbytes`` per rank (vectorised; see the module docstring)."""
    return allreduce_terms(algorithm, nbytes, nodes, ranks_per_node).time(cost)


def allreduce_affine(algorithm: str, nodes, ranks_per_node, cost: LinkCost) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` with ``allreduce_time(n) = A + B·n`` for the given placement: latency and s/byte."""
    at_zero = allreduce_terms(algorithm, 0.0, nodes, ranks_per_node)
    at_one = allreduce_terms(algorithm, 1.0, nodes, ranks_per_node)
    a = at_zero.time(cost)
    return a, at_one.time(cost) - a


def single_link_time(algorithm: str, nbytes, ranks, alpha_s: float, beta_s_per_byte: float,
                     gamma_s_per_byte: float = 0.0) -> np.ndarray:
    """The textbook one-link cost (all ranks behind the same α, β): ``nodes = ranks``, one rank per node."""
    cost = LinkCost(alpha_s, beta_s_per_byte, alpha_s, beta_s_per_byte, gamma_s_per_byte)
    return allreduce_time(algorithm, nbytes, ranks, 1, cost)


def algorithm_bandwidth(nbytes, seconds) -> np.ndarray:
    """algbw = n / t, bytes per second (nccl-tests' definition)."""
    return np.asarray(nbytes, dtype=float) / np.asarray(seconds, dtype=float)


def bus_bandwidth(nbytes, seconds, ranks) -> np.ndarray:
    """busbw = algbw · 2(p−1)/p for allreduce (nccl-tests): comparable with the link speed for any p.

    A bandwidth-optimal allreduce moves 2(p−1)/p·n bytes per rank, so busbw equals the link's bytes/s when
    the collective runs at link speed, whatever the number of ranks.
    """
    p = np.asarray(ranks, dtype=float)
    return algorithm_bandwidth(nbytes, seconds) * 2 * (p - 1) / p


def fuse_buckets(tensor_bytes, fusion_bytes: float) -> list[list[int]]:
    """Greedy packing of tensors (in the order they become ready) into buckets of at most ``fusion_bytes``.

    A tensor larger than the buffer travels alone (Horovod does not split tensors). This is the static
    packing when every tensor is ready at once; :func:`analysis.overlap.simulate` does the time-dependent
    packing (only tensors ready by the time a bucket launches are fused).
    """
    if fusion_bytes <= 0:
        raise ValueError(f"fusion buffer must be > 0 bytes, got {fusion_bytes!r}")
    buckets: list[list[int]] = []
    filled = 0.0
    for index, size in enumerate(tensor_bytes):
        if buckets and filled + size <= fusion_bytes:
            buckets[-1].append(index)
            filled += size
        else:
            buckets.append([index])
            filled = size
    return buckets
