/* Calls the C ABI on the CPU with host pointers. Writes op outputs to DIR/<op>.bin for the
 * Rust test to compare against the f64 reference, and checks the status codes of bad input
 * itself. Usage: capi_test DIR. Exit status 0 on success. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "thor_kernels.h"

static int failures = 0;

#define CHECK(cond, ...)                                        \
    do {                                                        \
        if (!(cond)) {                                          \
            fprintf(stderr, "FAIL line %d: ", __LINE__);        \
            fprintf(stderr, __VA_ARGS__);                       \
            fprintf(stderr, " (last error: %s)\n", thor_v1_last_error_message()); \
            failures++;                                         \
        }                                                       \
    } while (0)

#define OK(call) CHECK((call) == THOR_STATUS_OK, "%s", #call)

static uint32_t seed = 12345u;

/* The same LCG as the Rust test: uniform in [-1, 1). */
static void fill(float *v, size_t n) {
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        v[i] = ((float)(seed >> 8) / (float)(1u << 24)) * 2.0f - 1.0f;
    }
}

static void dump(const char *dir, const char *name, const float *v, size_t n) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.bin", dir, name);
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL, "open %s", path);
    if (f) {
        CHECK(fwrite(v, sizeof(float), n, f) == n, "write %s", path);
        fclose(f);
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: capi_test DIR\n");
        return 2;
    }
    const char *dir = argv[1];
    CHECK(thor_v1_abi_version() == 1, "abi version");
    ThorContext *ctx = NULL;
    OK(thor_v1_context_create_cpu(&ctx));

    enum { D = 70, B = 32, NB = 3, N = 100, G = 20 };
    float *dense = malloc(sizeof(float) * D * D);
    float *blocks = malloc(sizeof(float) * NB * B * B);
    float *x = malloc(sizeof(float) * N * D);
    float *stats = malloc(sizeof(float) * NB * B * B);
    float *inv = malloc(sizeof(float) * NB * B * B);
    float *grad = malloc(sizeof(float) * G * D);
    float *out = malloc(sizeof(float) * G * D);
    float btr[NB], ftr[1];
    int32_t info[NB];

    /* split + traces */
    fill(dense, D * D);
    OK(thor_v1_split(ctx, dense, D, D, B, blocks));
    dump(dir, "split", blocks, NB * B * B);
    int64_t dims[1] = {D};
    OK(thor_v1_traces(ctx, blocks, B, dims, 1, btr, ftr));
    dump(dir, "traces", ftr, 1);

    /* accumulate -> invert -> apply */
    fill(x, N * D);
    OK(thor_v1_accumulate(ctx, x, THOR_D_TYPE_F32, N, D, D, B, 1.0f / N, 0.0f, stats, btr));
    dump(dir, "accumulate", stats, NB * B * B);

    OK(thor_v1_invert(ctx, B, NB, stats, inv, NULL, 0.1f, NULL, NULL, info, NULL));
    for (int j = 0; j < NB; j++) CHECK(info[j] == 0, "info[%d] = %d", j, info[j]);
    dump(dir, "invert", inv, NB * B * B);
    fill(grad, G * D);
    OK(thor_v1_apply(ctx, B, NULL, G, grad, inv, D, 1.0f, out));
    dump(dir, "apply", out, G * D);

    /* Grouped: the same factor plus a second one whose input holds a NaN. */
    {
        enum { D2 = 40, NB2 = 2 };
        int64_t gdims[2] = {D, D2}, grows[2] = {N, N}, glds[2] = {D, D2 + 3};
        float *x2 = malloc(sizeof(float) * N * (D2 + 3));
        float *gblocks = malloc(sizeof(float) * (NB + NB2) * B * B);
        float gbt[NB + NB2], gft[2], alphas[2] = {1.0f / N, 1.0f / N}, betas[2] = {0.0f, 0.0f};
        int32_t gst[2] = {-1, -1};
        fill(x2, N * (D2 + 3));
        x2[5] = NAN;
        for (int i = 0; i < (NB + NB2) * B * B; i++) gblocks[i] = 3.0f;
        ThorAccumulatePlan *plan = NULL;
        OK(thor_v1_accumulate_plan_create(ctx, B, 2, gdims, grows, THOR_D_TYPE_F32, THOR_ACCUMULATE_MODE_F32, &plan));
        const void *gxs[2] = {x, x2};
        OK(thor_v1_accumulate_grouped(ctx, plan, gxs, glds, alphas, betas, gblocks, gbt, gft, gst));
        CHECK(gst[0] == 0 && gst[1] == 1, "grouped status %d %d", gst[0], gst[1]);
        CHECK(memcmp(gblocks, stats, sizeof(float) * NB * B * B) == 0, "grouped factor 0 equals the single call");
        for (int i = NB * B * B; i < (NB + NB2) * B * B; i++) CHECK(gblocks[i] == 3.0f, "NaN factor left unchanged");
        ThorAccumulatePlan *kept = plan;
        CHECK(thor_v1_accumulate_plan_create(ctx, B, 2, gdims, grows, THOR_D_TYPE_F32, 9, &plan) == THOR_STATUS_INVALID_ARGUMENT && plan == kept, "bad mode leaves *out as it was");
        thor_v1_accumulate_plan_destroy(plan);
        free(x2);
        free(gblocks);
    }

    /* Bad input: status codes, never a crash. */
    CHECK(thor_v1_split(ctx, NULL, D, D, B, blocks) == THOR_STATUS_INVALID_ARGUMENT, "null input");
    CHECK(strstr(thor_v1_last_error_message(), "dense") != NULL, "message names the argument");
    CHECK(thor_v1_split(NULL, dense, D, D, B, blocks) == THOR_STATUS_INVALID_ARGUMENT, "null context");
    CHECK(thor_v1_split(ctx, (const float *)((const char *)dense + 1), D, D, B, blocks) == THOR_STATUS_INVALID_ARGUMENT, "misaligned");
    CHECK(thor_v1_split(ctx, dense, D, D, 48, blocks) == THOR_STATUS_INVALID_ARGUMENT, "block size");
    CHECK(thor_v1_split(ctx, dense, D - 1, D, B, blocks) == THOR_STATUS_SHAPE, "ld < dim");
    CHECK(thor_v1_split(ctx, dense, D, -5, B, blocks) == THOR_STATUS_INVALID_ARGUMENT, "negative dim");
    CHECK(thor_v1_split(ctx, dense, D, D, B, dense + 10) == THOR_STATUS_INVALID_ARGUMENT, "overlap");
    CHECK(thor_v1_accumulate(ctx, x, 7, N, D, D, B, 1.0f, 0.0f, stats, btr) == THOR_STATUS_INVALID_ARGUMENT, "dtype");
    CHECK(thor_v1_accumulate(ctx, x, THOR_D_TYPE_F32, INT64_MAX / 2, D, D, B, 1.0f, 0.0f, stats, btr) == THOR_STATUS_INVALID_ARGUMENT, "overflow");
    CHECK(thor_v1_invert(ctx, B, NB, stats, inv, NULL, -1.0f, NULL, NULL, info, NULL) == THOR_STATUS_INVALID_ARGUMENT, "negative damping");
    CHECK(thor_v1_invert(ctx, B, NB, stats, stats + 5, NULL, 0.1f, NULL, NULL, info, NULL) == THOR_STATUS_INVALID_ARGUMENT, "partial overlap");
    OK(thor_v1_invert(ctx, B, NB, stats, stats, NULL, 0.1f, NULL, NULL, info, NULL)); /* in place is fine */
    dense[3] = NAN;
    OK(thor_v1_split(ctx, dense, D, D, B, blocks)); /* a pure copy: NaN goes through */
    CHECK(isnan(blocks[3]), "NaN copied");
    int32_t decision = -1;
    OK(thor_v1_trace_rule(1.0, 1.5, 0.01, 0.001, &decision));
    CHECK(decision == THOR_DECISION_UPDATE, "rule: update");
    decision = -1;
    CHECK(thor_v1_trace_rule(1.0, NAN, 0.01, 0.001, &decision) == THOR_STATUS_INVALID_ARGUMENT, "rule: NaN trace");
    CHECK(thor_v1_trace_rule(INFINITY, 1.0, 0.01, 0.001, &decision) == THOR_STATUS_INVALID_ARGUMENT, "rule: Inf trace");
    CHECK(decision == -1, "rule: no decision written on failure");
    CHECK(thor_v1_trace_rule(1.0, 1.5, 0.001, 0.01, &decision) == THOR_STATUS_INVALID_ARGUMENT, "rule: w1 < w2");
    CHECK(thor_v1_trace_rule(1.0, 1.5, NAN, 0.0, &decision) == THOR_STATUS_INVALID_ARGUMENT, "rule: NaN w1");
    if (failures == 0) printf("bad-input checks passed\n");

    /* The optimizer: one linear layer with bias. */
    ThorOptimizerConfig cfg;
    OK(thor_v1_optimizer_config_default(&cfg));
    cfg.block = 32;
    cfg.interval = 1;
    ThorOptimizer *opt = NULL;
    OK(thor_v1_optimizer_create(&cfg, &opt));
    int32_t layer = -1;
    OK(thor_v1_optimizer_add_linear(opt, 10, 4, 1, &layer));
    CHECK(layer == 0, "layer id");
    CHECK(thor_v1_optimizer_add_linear(opt, 0, 4, 1, &layer) == THOR_STATUS_INVALID_ARGUMENT, "zero-size layer");
    float acts[16 * 10], og[16 * 4], g[4 * 11], pg[4 * 11];
    fill(acts, 16 * 10);
    fill(og, 16 * 4);
    fill(g, 4 * 11);
    int32_t need = 0, obs = -1;
    OK(thor_v1_optimizer_needs_statistics(opt, &need));
    CHECK(need == 1, "first step needs statistics");
    OK(thor_v1_optimizer_observe(opt, 0, acts, og, 16, &obs));
    CHECK(obs == THOR_DECISION_UPDATE, "first observation updates");
    OK(thor_v1_optimizer_precondition(opt, 0, g, pg));
    OK(thor_v1_optimizer_finish_step(opt));
    og[5] = INFINITY;
    OK(thor_v1_optimizer_observe(opt, 0, acts, og, 16, &obs));
    CHECK(obs == THOR_DECISION_SKIPPED, "non-finite gradients are skipped");
    ThorCounters c;
    OK(thor_v1_optimizer_counters(opt, 0, &c));
    CHECK(c.statistics == 1 && c.updates == 1 && c.skipped == 1, "counters");
    CHECK(thor_v1_optimizer_precondition(opt, 3, g, pg) == THOR_STATUS_INVALID_ARGUMENT, "unknown layer");
    char path[4096];
    snprintf(path, sizeof path, "%s/state.thor", dir);
    OK(thor_v1_optimizer_save(opt, path));
    OK(thor_v1_optimizer_load(opt, path));
    snprintf(path, sizeof path, "%s/missing.thor", dir);
    CHECK(thor_v1_optimizer_load(opt, path) == THOR_STATUS_INVALID_ARGUMENT, "missing state file");
    int32_t last = -1;
    OK(thor_v1_optimizer_last_decision(opt, 0, &last));
    CHECK(last == THOR_DECISION_SKIPPED, "last decision");
    thor_v1_optimizer_destroy(opt);
    /* The same on a context: a CPU context gives a CPU optimizer (host pointers). */
    ThorOptimizer *on = NULL;
    CHECK(thor_v1_optimizer_create_on(NULL, &cfg, &on) == THOR_STATUS_INVALID_ARGUMENT && on == NULL, "null context");
    OK(thor_v1_optimizer_create_on(ctx, &cfg, &on));
    OK(thor_v1_optimizer_add_linear(on, 10, 4, 1, &layer));
    og[5] = 0.5f;
    OK(thor_v1_optimizer_observe(on, 0, acts, og, 16, NULL));
    OK(thor_v1_optimizer_last_decision(on, 0, &last));
    CHECK(last == THOR_DECISION_UPDATE, "first observation on a context updates");
    thor_v1_optimizer_destroy(on);
    if (failures == 0) printf("optimizer checks passed\n");

    thor_v1_context_destroy(ctx);
    free(dense); free(blocks); free(x); free(stats); free(inv); free(grad); free(out);
    return failures == 0 ? 0 : 1;
}
