// THOR's trace rule on the device: per layer, from this statistics step's factor traces and
// the last step's layer trace, decide update / reuse / freeze, write the block mask the
// inversion kernel reads, and append the decisions to a ring buffer the host reads later,
// so the step never waits for the host.
//
// One thread block; a thread per layer (strided). Layer trace, in double:
//   tr(F) = (tr(A) + sqrt(l) d_A) * (tr(G) + sqrt(l) d_G),  a missing factor contributing 1.
// delta = |tr - prev| / prev: > w1 update, [w2, w1] reuse, < w2 freeze (for good).
// A non-finite trace never updates and never unfreezes: the layer reuses, and its previous
// trace is kept. The first finite trace of a layer updates. A layer one of whose factors has
// a non-zero status (its statistics were not updated: a NaN or Inf in its input) is skipped:
// decision 4, no update of its inverses, its previous trace and state kept.
//
// Optionally (null to leave out) the rule keeps, per factor, the state the accumulation
// reads (bit 0: holds statistics, set once a layer's statistics are accepted; bit 1: frozen,
// set when the layer freezes), and per layer six counters in the order of the optimizer's
// LayerCounters: statistics, updates, reuses, freezes, skipped, failed inversions. An
// update is counted by rule_tally_f32 after the inversion (updates, or failed inversions
// when a block of the layer failed).
#include "common.cuh"

#define RULE_UPDATE 0
#define RULE_REUSE 1
#define RULE_FREEZE 2
#define RULE_FROZEN 3
#define RULE_SKIPPED 4
#define RULE_HAS_PREV 1
#define RULE_IS_FROZEN 2
#define FACTOR_HAS_STATS 1  // as ACC_HAS_STATS in accumulate.cu
#define FACTOR_FROZEN 2     // as ACC_FROZEN
#define C_STATISTICS 0
#define C_UPDATES 1
#define C_REUSES 2
#define C_FREEZES 3
#define C_SKIPPED 4
#define C_FAILED 5

// layers: 6 ints per layer: A factor index (-1: none), G factor index (-1: none), d_A, d_G,
// first block, block count (the layer's blocks in the set, A's then G's).
// factor_status: one int per factor (0 = statistics updated), or null.
// damping_at: the damping read from device memory (so that a captured step follows a damping
// schedule without recapture), or null for the `damping` argument. block_damping: one float
// per block of the set, or null: every layer's blocks get sqrt(damping), the per-block
// damping the inversion reads.
extern "C" __global__ void __launch_bounds__(256)
trace_rule_f32(const float* factor_traces, const int* factor_status, const int* layers,
               int n_layers, float damping,
               double w1, double w2, double* prev, unsigned char* state, unsigned char* mask,
               int* decisions, int* history, int history_capacity,
               unsigned long long* step, unsigned char* factor_state,
               unsigned long long* counters, const float* damping_at, float* block_damping) {
    const unsigned long long s = *step;
    if (damping_at != nullptr) damping = *damping_at;
    const double sq = sqrt((double)fmaxf(damping, 0.f));
    for (int l = threadIdx.x; l < n_layers; l += blockDim.x) {
        const int* d = layers + 6 * l;
        double tr = 1.0;
        if (d[0] >= 0) tr *= (double)factor_traces[d[0]] + sq * d[2];
        if (d[1] >= 0) tr *= (double)factor_traces[d[1]] + sq * d[3];
        unsigned char st = state[l];
        const bool finite = fabs(tr) <= 1.7976931348623157e308;  // false for NaN and Inf
        const bool skipped = factor_status != nullptr &&
                             ((d[0] >= 0 && factor_status[d[0]] != 0) ||
                              (d[1] >= 0 && factor_status[d[1]] != 0));
        int decision;
        if (st & RULE_IS_FROZEN) {
            decision = RULE_FROZEN;
        } else if (skipped) {
            decision = RULE_SKIPPED;
        } else if (!finite) {
            decision = RULE_REUSE;  // never an update, never an unfreeze
        } else if (!(st & RULE_HAS_PREV) || !(prev[l] > 0.0)) {
            decision = RULE_UPDATE;
        } else {
            const double delta = fabs(tr - prev[l]) / prev[l];
            decision = delta > w1 ? RULE_UPDATE : (delta >= w2 ? RULE_REUSE : RULE_FREEZE);
        }
        if (decision != RULE_FROZEN && decision != RULE_SKIPPED && finite) {
            prev[l] = tr;
            st |= RULE_HAS_PREV;
        }
        if (decision == RULE_FREEZE) st |= RULE_IS_FROZEN;
        state[l] = st;
        decisions[l] = decision;
        if (history_capacity > 0) {
            history[(long long)(s % (unsigned long long)history_capacity) * n_layers + l] = decision;
        }
        const bool accepted = decision != RULE_FROZEN && decision != RULE_SKIPPED;
        if (factor_state != nullptr && accepted) {
            const unsigned char add =
                FACTOR_HAS_STATS | (decision == RULE_FREEZE ? FACTOR_FROZEN : 0);
            if (d[0] >= 0) factor_state[d[0]] |= add;
            if (d[1] >= 0) factor_state[d[1]] |= add;
        }
        if (counters != nullptr) {
            unsigned long long* c = counters + 6 * (long long)l;
            if (decision == RULE_SKIPPED) c[C_SKIPPED] += 1;
            if (accepted) c[C_STATISTICS] += 1;
            if (decision == RULE_REUSE) c[C_REUSES] += 1;
            if (decision == RULE_FREEZE) c[C_FREEZES] = 1;
        }
        const unsigned char m = decision == RULE_UPDATE ? 1 : 0;
        for (int k = 0; k < d[5]; ++k) mask[d[4] + k] = m;
        if (block_damping != nullptr) {
            // As the host computes it: the f32 square root of the f32 damping (a damping
            // that is negative or not finite reaches the inversion as such: info -2).
            const float root = sqrtf(damping);
            for (int k = 0; k < d[5]; ++k) block_damping[d[4] + k] = root;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) *step = s + 1;
}

// After the masked inversion: each layer the rule updated counts an update, or a failed
// inversion when any of its blocks failed (info != 0; the block kept its previous inverse).
// One thread block, a thread per layer (strided).
extern "C" __global__ void __launch_bounds__(256)
rule_tally_f32(const int* layers, int n_layers, const int* decisions, const int* info,
               unsigned long long* counters) {
    for (int l = threadIdx.x; l < n_layers; l += blockDim.x) {
        if (decisions[l] != RULE_UPDATE) continue;
        const int* d = layers + 6 * l;
        bool failed = false;
        for (int k = 0; k < d[5]; ++k) failed |= info[d[4] + k] != 0;
        counters[6 * (long long)l + (failed ? C_FAILED : C_UPDATES)] += 1;
    }
}
