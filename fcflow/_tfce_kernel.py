"""Compiled (numba) TFCE kernel behind :func:`fcflow.clusters.tfce_vector`.

Imported lazily, so that code that never computes TFCE does not pay numba's import (about
1 s). Compiled code is cached in ``__pycache__`` beside this file (numba's ``cache=True``).

Algorithm
---------
TFCE needs, for every voxel and every threshold step it reaches, the size of its cluster at
that step: the component tree (max-tree) of the statistic map quantised to the step levels.
:func:`tfce_one_sign` builds it by flooding (Salembier et al. 1998, in the iterative form of
Nistér & Stewénius 2008, "Linear time maximally stable extremal regions"): a depth-first walk
over the voxels that reach at least the first step, which always continues from the highest
waiting voxel (one LIFO bucket per level), climbs into higher neighbours at once, and keeps a
stack of the open components, one per level on the current path. When the walk comes back
down to level ``L``, the components above ``L`` are closed: each is a tree node with a size
(extent) that stayed constant from its own level down to its parent's, so it contributes
``size**E * (S[level] - S[parent_level])`` to each of its voxels, with ``S`` the prefix sums
of ``h**H`` over the steps. A voxel's TFCE is the sum of the contributions of its node and of
the node's ancestors, read off in one pass over the nodes in reverse closing order.

Each voxel is visited once and the walk stays spatially local, so the cost is O(V) per map
and sign whatever the number of steps, and memory traffic is mostly cache hits: on the 2 mm
MNI mask (235k voxels) it is several times faster than labelling per step.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _levels(values, sign, thresholds):
    """``np.searchsorted(thresholds, sign * values, side="right")`` as int16 (ascending steps)."""
    n_voxels = values.shape[0]
    n_steps = thresholds.shape[0]
    level = np.zeros(n_voxels, dtype=np.int16)
    first = thresholds[0]
    for v in range(n_voxels):
        x = sign * np.float64(values[v])
        if not x >= first:  # also NaN
            continue
        # the steps are (nearly) multiples of the first: guess, then correct on the exact values
        guess = x / first if first > 0 else n_steps
        lv = n_steps if guess >= n_steps else int(guess)
        while lv < n_steps and thresholds[lv] <= x:
            lv += 1
        while lv > 0 and thresholds[lv - 1] > x:
            lv -= 1
        level[v] = lv
    return level


@njit(cache=True, nogil=True)
def tfce_one_sign(values, sign, neighbors, thresholds, extent_exponent, height_exponent, out):
    """TFCE of the positive part of ``sign * values``, an in-mask vector.

    Parameters
    ----------
    values : ndarray of shape (n_voxels,), float32 or float64
    sign : float
        1.0 or -1.0 (the negative part of a two-sided map).
    neighbors : ndarray of shape (n_voxels, n_neighbors), int32
        :attr:`fcflow.clusters.VoxelGraph.neighbors` (``n_voxels`` marks no neighbour).
    thresholds : ndarray of shape (n_steps,), float64, ascending, at most 32767 steps
        A voxel reaches step ``i`` when ``sign * values >= thresholds[i]``.
    extent_exponent, height_exponent : float
    out : ndarray of shape (n_voxels,) or (0,), float64
        ``sign * tfce`` is added to it; an empty array skips the per-voxel values (the null
        distribution needs only the maximum).

    Returns
    -------
    max_tfce : float
        The largest TFCE, ``sum_i extent_i**E * thresholds[i]**H`` over the steps a voxel
        reaches, with ``extent_i`` the voxel count of its connected component of
        ``sign * values >= thresholds[i]``; 0 when no voxel reaches the first step.
    """
    n_voxels = values.shape[0]
    n_steps = thresholds.shape[0]
    n_neighbors = neighbors.shape[1]
    # level[v] > 0: steps reached; negated once the walk has reached the voxel
    level = _levels(values, sign, thresholds)
    prefix = np.zeros(n_steps + 1)
    for i in range(1, n_steps + 1):
        prefix[i] = prefix[i - 1] + thresholds[i - 1] ** height_exponent
    square_root = extent_exponent == 0.5

    next_edge = np.empty(n_voxels, dtype=np.int8)  # where a waiting voxel resumes its neighbours
    below = np.empty(n_voxels, dtype=np.int32)  # LIFO bucket links
    head = np.full(n_steps + 1, -1, dtype=np.int32)
    node_of = np.empty(n_voxels, dtype=np.int32)
    capacity = 2 * n_voxels + 1  # one node per climb and one per partial descent, at most
    node_parent = np.empty(capacity, dtype=np.int32)
    node_value = np.empty(capacity)
    closed = np.empty(capacity, dtype=np.int32)
    open_level = np.empty(n_steps + 2, dtype=np.int64)
    open_size = np.empty(n_steps + 2, dtype=np.int64)
    open_node = np.empty(n_steps + 2, dtype=np.int64)
    n_nodes = 0
    n_closed = 0
    for source in range(n_voxels):
        if level[source] <= 0:
            continue
        # the bottom of the stack is a sentinel component at level 0 (no contribution)
        open_level[0] = 0
        open_size[0] = 0
        open_node[0] = -1
        current = source
        edge = 0
        current_level = np.int64(level[source])
        level[source] = -level[source]
        top = 1
        open_level[1] = current_level
        open_size[1] = 0
        open_node[1] = n_nodes
        n_nodes += 1
        highest_waiting = 0
        while True:
            climbed = False
            while edge < n_neighbors:
                w = neighbors[current, edge]
                edge += 1
                if w >= n_voxels:
                    continue
                level_w = np.int64(level[w])
                if level_w <= 0:  # never reaches a step, or already reached by the walk
                    continue
                level[w] = -level[w]
                if level_w > current_level:
                    # climb: the current voxel waits, a new component opens above it
                    next_edge[current] = edge
                    below[current] = head[current_level]
                    head[current_level] = current
                    if current_level > highest_waiting:
                        highest_waiting = current_level
                    current = w
                    edge = 0
                    current_level = level_w
                    top += 1
                    open_level[top] = current_level
                    open_size[top] = 0
                    open_node[top] = n_nodes
                    n_nodes += 1
                    climbed = True
                    break
                next_edge[w] = 0
                below[w] = head[level_w]
                head[level_w] = w
                if level_w > highest_waiting:
                    highest_waiting = level_w
            if climbed:
                continue
            open_size[top] += 1
            node_of[current] = open_node[top]
            step = highest_waiting
            while step > 0 and head[step] < 0:
                step -= 1
            highest_waiting = step
            # close the components above the next level (0 when this walk is over)
            while step < open_level[top]:
                node = open_node[top]
                size = open_size[top]
                extent = math.sqrt(size) if square_root else size**extent_exponent
                floor = open_level[top - 1]
                if step > floor:
                    # the component goes on, unchanged, down to `step`: a new parent node
                    node_parent[node] = n_nodes
                    node_value[node] = extent * (prefix[open_level[top]] - prefix[step])
                    closed[n_closed] = node
                    n_closed += 1
                    open_level[top] = step
                    open_node[top] = n_nodes
                    n_nodes += 1
                    break
                node_parent[node] = open_node[top - 1]
                node_value[node] = extent * (prefix[open_level[top]] - prefix[floor])
                closed[n_closed] = node
                n_closed += 1
                open_size[top - 1] += size
                top -= 1
            if step == 0:
                break
            current = head[step]
            head[step] = below[current]
            edge = np.int64(next_edge[current])
            current_level = step
    # parents close after their children: accumulate from the roots up the tree
    largest = 0.0
    for i in range(n_closed - 1, -1, -1):
        node = closed[i]
        parent = node_parent[node]
        if parent >= 0:
            node_value[node] += node_value[parent]
        if node_value[node] > largest:
            largest = node_value[node]
    if out.shape[0] > 0:
        for v in range(n_voxels):
            if level[v] < 0:
                out[v] += sign * node_value[node_of[v]]
    return largest
