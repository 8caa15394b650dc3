// test_native.cpp - the hook against synthetic kqv_out tensors (run under ASan by `make asan`).
// Linked against the FGDILP_TESTING build of the sources: every hook test runs twice, once reading
// kqv_out in place (CPU) and once through ggml_backend_tensor_get/set (the GPU path).
#include "fgdilp.h"
#include "internal.h"
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <vector>

static int g_pass = 0, g_fail = 0;
#define CHECK(cond)                                                          \
    do {                                                                     \
        if (cond) { ++g_pass; }                                              \
        else { ++g_fail; std::fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); } \
    } while (0)

static const int N_LAYER = 3, N_HEAD = 4, HEAD_DIM = 8, WIDTH = N_HEAD * HEAD_DIM, ROWS = 5;

// N_LAYER kqv_out nodes [width][ROWS] in a CPU backend buffer (so the device path can use it too)
struct fixture {
    ggml_context * ctx = nullptr;
    ggml_backend_buffer_t buf = nullptr;
    std::vector<ggml_tensor *> layers;
    fixture(ggml_type type = GGML_TYPE_F32, int width = WIDTH, ggml_op op = GGML_OP_CONT) {
        ggml_init_params ip = {64 * ggml_tensor_overhead(), nullptr, true};
        ctx = ggml_init(ip);
        for (int il = 0; il < N_LAYER; ++il) {
            ggml_tensor * t = ggml_new_tensor_2d(ctx, type, width, ROWS);
            ggml_format_name(t, "kqv_out-%d", il);
            t->op = op;
            layers.push_back(t);
        }
        buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml_backend_cpu_buffer_type());
        for (int il = 0; il < N_LAYER; ++il) {
            ggml_tensor * t = layers[il];
            if (type == GGML_TYPE_F32) {
                float * d = (float *) t->data;
                for (int i = 0; i < width * ROWS; ++i) {
                    d[i] = std::sin(0.37f * i + 1.3f * il) + 0.1f * (float) (i % 7);
                }
            }
        }
    }
    ~fixture() {
        ggml_backend_buffer_free(buf);
        ggml_free(ctx);
    }
    float * row(int il, int r) { return (float *) layers[il]->data + (size_t) r * WIDTH; }
    std::vector<float> copy() const {
        std::vector<float> out((size_t) N_LAYER * WIDTH * ROWS);
        for (int il = 0; il < N_LAYER; ++il) std::memcpy(&out[(size_t) il * WIDTH * ROWS], layers[il]->data, sizeof(float) * WIDTH * ROWS);
        return out;
    }
    // what the scheduler does: ask, then call for the asked node; a false answer stops the graph.
    // Returns whether every call answered true.
    bool run_layers(fgdilp_hook * h, std::initializer_list<int> order, int n_tokens = ROWS) {
        fgdilp_hook_begin(h, n_tokens);
        for (int il : order) {
            if (fgdilp_hook_eval_callback(layers[il], true, h) && !fgdilp_hook_eval_callback(layers[il], false, h)) {
                return false;
            }
        }
        return true;
    }
    bool run(fgdilp_hook * h, int n_layers = N_LAYER) {
        fgdilp_hook_begin(h, ROWS);
        for (int il = 0; il < n_layers; ++il) {
            if (fgdilp_hook_eval_callback(layers[il], true, h) && !fgdilp_hook_eval_callback(layers[il], false, h)) {
                return false;
            }
        }
        return true;
    }
};

static fgdilp_hook * make_hook() {
    fgdilp_hook_params p = fgdilp_hook_default_params();
    p.n_layer = N_LAYER; p.n_head = N_HEAD; p.head_dim = HEAD_DIM; p.n_slots = 3;
    return fgdilp_hook_init(&p);
}

static fgdilp_fusion_params fusion(float k_pct, int32_t mode, bool elect) {
    fgdilp_fusion_params f = fgdilp_fusion_default_params();
    f.k_pct = k_pct; f.mode = mode; f.elect = elect;
    return f;
}

// a hook that runs plain TR on one negative: K = 100 keeps the delta whole
static fgdilp_hook * make_tr_hook() {
    fgdilp_hook * h = make_hook();
    const fgdilp_fusion_params f = fusion(100.0f, FGDILP_FUSION_MAX, true);
    CHECK(fgdilp_hook_set_fusion(h, &f) == FGDILP_OK);
    return h;
}

static fgdilp_edit tr_edit(int target, int pos, int neg, int e_slot) {
    fgdilp_edit e;
    std::memset(&e, 0, sizeof e);
    e.target_row = target; e.pos_row = pos; e.neg_rows[0] = neg; e.n_neg = 1; e.dir_slot = -1; e.e_slot = e_slot;
    return e;
}

static double norm(const float * x, int n) {
    double s = 0; for (int i = 0; i < n; ++i) s += (double) x[i] * x[i]; return std::sqrt(s);
}

static void test_params() {
    fgdilp_hook_params p = fgdilp_hook_default_params();
    CHECK(p.exp_norm == 0.4f && p.exp_sim == 0.6f && p.renorm && p.scale == 1.0f);
    CHECK(fgdilp_hook_init(&p) == nullptr); // n_layer 0
    CHECK(fgdilp_hook_init(nullptr) == nullptr);
    fgdilp_hook_free(nullptr);
}

static void test_ask_filter() {
    fgdilp_hook * h = make_hook();
    fixture f;
    CHECK(!fgdilp_hook_eval_callback(f.layers[0], true, h)); // empty plan: ask for nothing
    fgdilp_capture c = {1, 0};
    CHECK(fgdilp_hook_set_plan(h, &c, 1, nullptr, 0) == FGDILP_OK);
    CHECK(fgdilp_hook_eval_callback(f.layers[0], true, h));
    const char * others[] = {"kqv_out", "kqv_out-", "kqv_out-x", "kqv_out-1a", "kq-1", "attn_out-1", "kqv-1"};
    for (const char * name : others) {
        ggml_set_name(f.layers[1], name);
        CHECK(!fgdilp_hook_eval_callback(f.layers[1], true, h));
    }
    fgdilp_hook_free(h);
}

static void test_capture_and_edit() {
    fgdilp_hook * h = make_tr_hook(); // n_neg = 1, K = 100: the old TR behaviour, bit for bit
    fixture f;
    std::vector<float> before(f.layers.size() * WIDTH * ROWS);
    for (int il = 0; il < N_LAYER; ++il) std::memcpy(&before[il * WIDTH * ROWS], f.row(il, 0), sizeof(float) * WIDTH * ROWS);
    fgdilp_capture caps[2] = {{3, 0}, {1, 1}};           // e from row 3, P- row 1 copied to slot 1
    fgdilp_edit e = tr_edit(4, 0, 1, 0);                 // P+ row 0, P- row 1, P0 row 4
    CHECK(fgdilp_hook_set_plan(h, caps, 2, &e, 1) == FGDILP_OK);
    CHECK(f.run(h));
    CHECK(fgdilp_hook_end(h) == FGDILP_OK);
    CHECK(fgdilp_hook_fired_layers(h) == N_LAYER);
    CHECK(fgdilp_hook_edits_applied(h) == N_LAYER);
    const float * slots = fgdilp_hook_slots(h);
    for (int il = 0; il < N_LAYER; ++il) {
        const float * b = &before[il * WIDTH * ROWS];
        CHECK(std::memcmp(slots + (0 * N_LAYER + il) * WIDTH, b + 3 * WIDTH, sizeof(float) * WIDTH) == 0);
        CHECK(std::memcmp(slots + (1 * N_LAYER + il) * WIDTH, b + 1 * WIDTH, sizeof(float) * WIDTH) == 0);
        // rows other than the target are bit-identical
        CHECK(std::memcmp(f.row(il, 0), b, sizeof(float) * WIDTH * 4) == 0);
        // target equals the reference edit
        std::vector<float> v(b + 4 * WIDTH, b + 5 * WIDTH), d(WIDTH);
        for (int i = 0; i < WIDTH; ++i) d[i] = b[WIDTH + i] - b[i];
        CHECK(fgdilp_tr_edit_row(v.data(), d.data(), b + 3 * WIDTH, N_HEAD, HEAD_DIM, 0.4f, 0.6f, 1.0f, true) == FGDILP_OK);
        CHECK(std::memcmp(f.row(il, 4), v.data(), sizeof(float) * WIDTH) == 0);
        CHECK(std::memcmp(f.row(il, 4), b + 4 * WIDTH, sizeof(float) * WIDTH) != 0);
        CHECK(std::fabs(norm(f.row(il, 4), WIDTH) - norm(b + 4 * WIDTH, WIDTH)) < 1e-4);
    }
    fgdilp_hook_free(h);
}

static void test_edit_math() {
    // one head, e parallel to v: lambda_sim = 2^b; delta norm 3: lambda_norm = 4^a
    float v[2] = {1.0f, 0.0f}, d[2] = {3.0f, 0.0f}, e[2] = {2.0f, 0.0f};
    CHECK(fgdilp_tr_edit_row(v, d, e, 1, 2, 0.5f, 1.0f, 1.0f, false) == FGDILP_OK);
    CHECK(std::fabs(v[0] - (1.0f - 2.0f * 2.0f * 3.0f)) < 1e-5f && v[1] == 0.0f);
    float w[2] = {1.0f, 0.0f}, e2[2] = {-1.0f, 0.0f};  // negative cosine clamps to 0
    CHECK(fgdilp_tr_edit_row(w, d, e2, 1, 2, 0.5f, 1.0f, 1.0f, false) == FGDILP_OK);
    CHECK(std::fabs(w[0] - (1.0f - 2.0f * 3.0f)) < 1e-5f);
    float z[2] = {0.0f, 0.0f}; // zero row stays finite under renorm
    CHECK(fgdilp_tr_edit_row(z, d, nullptr, 1, 2, 0.5f, 1.0f, 1.0f, true) == FGDILP_OK);
    CHECK(std::isfinite(z[0]) && std::isfinite(z[1]));
    CHECK(fgdilp_tr_edit_row(nullptr, d, nullptr, 1, 2, 0.5f, 1.0f, 1.0f, true) == FGDILP_ERR_ARG);
}

static void test_dir_slot_and_scales() {
    fgdilp_hook * h = make_hook();
    fixture f;
    float * slots = fgdilp_hook_slots(h);
    for (int i = 0; i < N_LAYER * WIDTH; ++i) slots[2 * N_LAYER * WIDTH + i] = 0.01f * (float) (i % 11);
    const float scales[N_LAYER] = {0.0f, 1.0f, 0.0f};
    CHECK(fgdilp_hook_set_layer_scales(h, scales, N_LAYER) == FGDILP_OK);
    CHECK(fgdilp_hook_set_layer_scales(h, scales, 2) == FGDILP_ERR_ARG);
    fgdilp_edit e = tr_edit(2, -1, -1, -1);
    e.dir_slot = 2; e.n_neg = 0;
    CHECK(fgdilp_hook_set_plan(h, nullptr, 0, &e, 1) == FGDILP_OK);
    std::vector<float> l0(f.row(0, 0), f.row(0, 0) + WIDTH * ROWS), l1(f.row(1, 0), f.row(1, 0) + WIDTH * ROWS);
    CHECK(f.run(h));
    CHECK(fgdilp_hook_end(h) == FGDILP_OK);
    CHECK(fgdilp_hook_edits_applied(h) == 1);
    CHECK(std::memcmp(f.row(0, 0), l0.data(), sizeof(float) * WIDTH * ROWS) == 0); // scale 0: untouched
    CHECK(std::memcmp(f.row(1, 2), &l1[2 * WIDTH], sizeof(float) * WIDTH) != 0);
    slots[5] = NAN;
    CHECK(fgdilp_hook_check_slots(h) == FGDILP_ERR_NONFINITE);
    fgdilp_hook_free(h);
}

static void test_errors() {
    fgdilp_hook * h = make_tr_hook();
    fgdilp_edit e = tr_edit(4, 0, 1, 0);
    CHECK(fgdilp_hook_set_plan(h, nullptr, 0, &e, 1) == FGDILP_OK);
    {   // not every layer fired: an architecture without the node, or a partial graph
        fixture f;
        CHECK(f.run(h, 1));
        CHECK(fgdilp_hook_end(h) == FGDILP_ERR_NOT_FIRED);
        CHECK(std::strstr(fgdilp_hook_last_error(h), "1 of 3") != nullptr);
        CHECK(fgdilp_hook_begin(h, ROWS) == FGDILP_OK);
        CHECK(fgdilp_hook_end(h) == FGDILP_ERR_NOT_FIRED); // nothing fired at all
    }
    {   fixture f(GGML_TYPE_F16);
        CHECK(!f.run(h));                  // the decode is stopped
        CHECK(fgdilp_hook_end(h) == FGDILP_ERR_TENSOR);
    }
    {   fixture f(GGML_TYPE_F32, WIDTH + HEAD_DIM);
        CHECK(!f.run(h));                  // the decode is stopped
        CHECK(fgdilp_hook_end(h) == FGDILP_ERR_TENSOR);
    }
    {   fixture f(GGML_TYPE_F32, WIDTH, GGML_OP_MUL_MAT); // e.g. an output already projected by W_O
        CHECK(!f.run(h));                  // the decode is stopped
        CHECK(fgdilp_hook_end(h) == FGDILP_ERR_TENSOR);
    }
    {   fixture f;
        fgdilp_edit far = tr_edit(ROWS, 0, 1, 0);
        CHECK(fgdilp_hook_set_plan(h, nullptr, 0, &far, 1) == FGDILP_OK);
        CHECK(fgdilp_hook_begin(h, ROWS) == FGDILP_ERR_ROW); // refused before any node
        CHECK(fgdilp_hook_end(h) == FGDILP_ERR_ROW);
    }
    fgdilp_edit bad = tr_edit(1, 0, 2, 7); // slot out of range
    CHECK(fgdilp_hook_set_plan(h, nullptr, 0, &bad, 1) == FGDILP_ERR_ARG);
    bad = tr_edit(1, 0, 2, 0); bad.n_neg = 0;                      // rows need a negative
    CHECK(fgdilp_hook_set_plan(h, nullptr, 0, &bad, 1) == FGDILP_ERR_ARG);
    bad.n_neg = FGDILP_MAX_NEG + 1;
    CHECK(fgdilp_hook_set_plan(h, nullptr, 0, &bad, 1) == FGDILP_ERR_ARG);
    bad = tr_edit(1, 0, 2, 0); bad.n_neg = 3; bad.neg_rows[1] = 3; bad.neg_rows[2] = -1;
    CHECK(fgdilp_hook_set_plan(h, nullptr, 0, &bad, 1) == FGDILP_ERR_ARG);
    bad = tr_edit(1, -1, 2, 0);                                    // rows need a positive
    CHECK(fgdilp_hook_set_plan(h, nullptr, 0, &bad, 1) == FGDILP_ERR_ARG);
    fgdilp_capture c = {-1, 0};
    CHECK(fgdilp_hook_set_plan(h, &c, 1, nullptr, 0) == FGDILP_ERR_ARG);
    CHECK(fgdilp_hook_set_plan(h, nullptr, 1, nullptr, 0) == FGDILP_ERR_ARG);
    CHECK(fgdilp_hook_set_exponents(h, NAN, 0.6f, true) == FGDILP_ERR_NONFINITE);
    fgdilp_hook_free(h);
}

static void test_fuse_api() {
    const fgdilp_fusion_params d = fgdilp_fusion_default_params();
    CHECK(d.k_pct == 50.0f && d.mode == FGDILP_FUSION_MAX && d.elect);
    // by hand (tests/test_fusion.py::test_fuse_by_hand): K = 50 keeps m1 = [3,0,2,0], m2 = [-4,-2,0,0]
    const float deltas[2][4] = {{3, -1, 2, 0.5f}, {-4, -2, 2, 1}};
    float out[4];
    CHECK(fgdilp_fuse(&deltas[0][0], 2, 4, &d, out) == FGDILP_OK);
    CHECK(out[0] == -4 && out[1] == -2 && out[2] == 2 && out[3] == 0);
    fgdilp_fusion_params f = fusion(50.0f, FGDILP_FUSION_MEAN, false);
    CHECK(fgdilp_fuse(&deltas[0][0], 2, 4, &f, out) == FGDILP_OK);
    CHECK(out[0] == -0.5f && out[1] == -2 && out[2] == 2 && out[3] == 0);
    f = fusion(100.0f, FGDILP_FUSION_SUM, true);
    CHECK(fgdilp_fuse(&deltas[0][0], 2, 4, &f, out) == FGDILP_OK);
    CHECK(out[0] == -4 && out[1] == -3 && out[2] == 4 && out[3] == 1.5f);
    // out may be the input
    float inplace[4] = {1, -2, 3, -4};
    f = fusion(50.0f, FGDILP_FUSION_MAX, true);
    CHECK(fgdilp_fuse(inplace, 1, 4, &f, inplace) == FGDILP_OK);
    CHECK(inplace[0] == 0 && inplace[1] == 0 && inplace[2] == 3 && inplace[3] == -4);
    // rejected: out untouched
    float keep[4] = {7, 7, 7, 7};
    CHECK(fgdilp_fuse(nullptr, 2, 4, &d, keep) == FGDILP_ERR_ARG);
    CHECK(fgdilp_fuse(&deltas[0][0], 2, 4, nullptr, keep) == FGDILP_ERR_ARG);
    CHECK(fgdilp_fuse(&deltas[0][0], 2, 4, &d, nullptr) == FGDILP_ERR_ARG);
    CHECK(fgdilp_fuse(&deltas[0][0], 0, 4, &d, keep) == FGDILP_ERR_ARG);
    CHECK(fgdilp_fuse(&deltas[0][0], FGDILP_MAX_NEG + 1, 4, &d, keep) == FGDILP_ERR_ARG);
    CHECK(fgdilp_fuse(&deltas[0][0], 2, 0, &d, keep) == FGDILP_ERR_ARG);
    const float bad_k[] = {0.0f, -1.0f, 100.5f, NAN, INFINITY};
    for (float k : bad_k) {
        f = fusion(k, FGDILP_FUSION_MAX, true);
        CHECK(fgdilp_fuse(&deltas[0][0], 2, 4, &f, keep) == FGDILP_ERR_ARG);
    }
    f = fusion(50.0f, 3, true);
    CHECK(fgdilp_fuse(&deltas[0][0], 2, 4, &f, keep) == FGDILP_ERR_ARG);
    f = fusion(50.0f, -1, true);
    CHECK(fgdilp_fuse(&deltas[0][0], 2, 4, &f, keep) == FGDILP_ERR_ARG);
    float nonfinite[2][4] = {{1, 2, 3, 4}, {1, NAN, 3, 4}};
    CHECK(fgdilp_fuse(&nonfinite[0][0], 2, 4, &d, keep) == FGDILP_ERR_NONFINITE);
    nonfinite[1][1] = -INFINITY;
    CHECK(fgdilp_fuse(&nonfinite[0][0], 2, 4, &d, keep) == FGDILP_ERR_NONFINITE);
    CHECK(keep[0] == 7 && keep[1] == 7 && keep[2] == 7 && keep[3] == 7);
}

// An edit with three negative rows equals delta_j by hand, fgdilp_fuse, fgdilp_tr_edit_row.
static void test_fused_edit() {
    const fgdilp_fusion_params params[] = {
        fgdilp_fusion_default_params(),
        fusion(30.0f, FGDILP_FUSION_MEAN, true),
        fusion(100.0f, FGDILP_FUSION_SUM, false),
        fusion(77.7f, FGDILP_FUSION_MAX, false),
    };
    for (const fgdilp_fusion_params & fp : params) {
        fgdilp_hook * h = make_hook();
        if (&fp != &params[0]) { // params[0]: the hook's own defaults
            CHECK(fgdilp_hook_set_fusion(h, &fp) == FGDILP_OK);
        }
        fixture f;
        std::vector<float> before((size_t) N_LAYER * WIDTH * ROWS);
        for (int il = 0; il < N_LAYER; ++il) std::memcpy(&before[(size_t) il * WIDTH * ROWS], f.row(il, 0), sizeof(float) * WIDTH * ROWS);
        fgdilp_capture cap = {3, 0};                       // e from row 3
        fgdilp_edit e = tr_edit(4, 0, 1, 0);               // P+ row 0, P0 row 4
        e.n_neg = 3; e.neg_rows[1] = 2; e.neg_rows[2] = 3; // P- rows 1, 2, 3
        CHECK(fgdilp_hook_set_plan(h, &cap, 1, &e, 1) == FGDILP_OK);
        CHECK(f.run(h));
        CHECK(fgdilp_hook_end(h) == FGDILP_OK);
        CHECK(fgdilp_hook_edits_applied(h) == N_LAYER);
        for (int il = 0; il < N_LAYER; ++il) {
            const float * b = &before[(size_t) il * WIDTH * ROWS];
            std::vector<float> deltas(3 * WIDTH), fused(WIDTH), v(b + 4 * WIDTH, b + 5 * WIDTH);
            for (int j = 0; j < 3; ++j)
                for (int i = 0; i < WIDTH; ++i) deltas[j * WIDTH + i] = b[(1 + j) * WIDTH + i] - b[i];
            CHECK(fgdilp_fuse(deltas.data(), 3, WIDTH, &fp, fused.data()) == FGDILP_OK);
            CHECK(fgdilp_tr_edit_row(v.data(), fused.data(), b + 3 * WIDTH, N_HEAD, HEAD_DIM, 0.4f, 0.6f, 1.0f, true) == FGDILP_OK);
            CHECK(std::memcmp(f.row(il, 4), v.data(), sizeof(float) * WIDTH) == 0);
            CHECK(std::memcmp(f.row(il, 0), b, sizeof(float) * WIDTH * 4) == 0); // other rows untouched
            // the fusion did something: differs from the plain first negative's TR
            std::vector<float> tr1(b + 4 * WIDTH, b + 5 * WIDTH);
            CHECK(fgdilp_tr_edit_row(tr1.data(), deltas.data(), b + 3 * WIDTH, N_HEAD, HEAD_DIM, 0.4f, 0.6f, 1.0f, true) == FGDILP_OK);
            CHECK(std::memcmp(f.row(il, 4), tr1.data(), sizeof(float) * WIDTH) != 0);
        }
        fgdilp_hook_free(h);
    }
}

// One negative with the C default K = 50: the delta is masked (half its entries), not plain TR.
static void test_one_negative_default_masks() {
    fgdilp_hook * h = make_hook();
    fixture f;
    std::vector<float> b(f.row(0, 0), f.row(0, 0) + WIDTH * ROWS);
    fgdilp_edit e = tr_edit(4, 0, 1, -1);
    CHECK(fgdilp_hook_set_plan(h, nullptr, 0, &e, 1) == FGDILP_OK);
    CHECK(f.run(h));
    CHECK(fgdilp_hook_end(h) == FGDILP_OK);
    std::vector<float> d(WIDTH), masked(WIDTH), v(&b[4 * WIDTH], &b[5 * WIDTH]);
    for (int i = 0; i < WIDTH; ++i) d[i] = b[WIDTH + i] - b[i];
    const fgdilp_fusion_params fp = fgdilp_fusion_default_params();
    CHECK(fgdilp_fuse(d.data(), 1, WIDTH, &fp, masked.data()) == FGDILP_OK);
    int nonzero = 0;
    for (int i = 0; i < WIDTH; ++i) nonzero += masked[i] != 0.0f;
    CHECK(nonzero == WIDTH / 2);
    CHECK(fgdilp_tr_edit_row(v.data(), masked.data(), nullptr, N_HEAD, HEAD_DIM, 0.4f, 0.6f, 1.0f, true) == FGDILP_OK);
    CHECK(std::memcmp(f.row(0, 4), v.data(), sizeof(float) * WIDTH) == 0);
    fgdilp_hook_free(h);
}

// NaN in a negative row of layer 1: the decode stops there, layer 1 is left as computed, and the
// error names the node.
static void test_fused_edit_nonfinite() {
    fgdilp_hook * h = make_hook();
    fgdilp_fusion_params fp = fusion(0.0f, FGDILP_FUSION_MAX, true);
    CHECK(fgdilp_hook_set_fusion(h, &fp) == FGDILP_ERR_ARG);
    CHECK(fgdilp_hook_set_fusion(h, nullptr) == FGDILP_ERR_ARG);
    CHECK(fgdilp_hook_set_fusion(nullptr, &fp) == FGDILP_ERR_ARG);
    fp = fusion(50.0f, 7, true);
    CHECK(fgdilp_hook_set_fusion(h, &fp) == FGDILP_ERR_ARG);
    fixture f;
    f.row(1, 2)[5] = NAN;
    std::vector<float> l1(f.row(1, 0), f.row(1, 0) + WIDTH * ROWS), l0(f.row(0, 4), f.row(0, 4) + WIDTH),
        l2(f.row(2, 0), f.row(2, 0) + WIDTH * ROWS);
    fgdilp_edit e = tr_edit(4, 0, 1, -1);
    e.n_neg = 2; e.neg_rows[1] = 2;
    CHECK(fgdilp_hook_set_plan(h, nullptr, 0, &e, 1) == FGDILP_OK);
    CHECK(!f.run(h));
    CHECK(fgdilp_hook_end(h) == FGDILP_ERR_NONFINITE);
    CHECK(std::strstr(fgdilp_hook_last_error(h), "kqv_out-1") != nullptr);
    CHECK(fgdilp_hook_fired_layers(h) == 2);
    CHECK(fgdilp_hook_edits_applied(h) == 1);
    CHECK(std::memcmp(f.row(1, 4), &l1[4 * WIDTH], sizeof(float) * WIDTH) == 0); // layer 1 untouched
    CHECK(std::memcmp(f.row(2, 0), l2.data(), sizeof(float) * WIDTH * ROWS) == 0); // layer 2 never reached
    CHECK(std::memcmp(f.row(0, 4), l0.data(), sizeof(float) * WIDTH) != 0);      // layer 0 edited
    fgdilp_hook_free(h);
}

static fgdilp_hook_params shape(int n_layer, int n_head, int head_dim) {
    fgdilp_hook_params p = fgdilp_hook_default_params();
    p.n_layer = n_layer; p.n_head = n_head; p.head_dim = head_dim; p.n_slots = 3;
    return p;
}

// fgdilp_hook_init refuses what fgdilp_hook_check_params refuses, with the reason in the status.
static void test_init_refusals() {
    const fgdilp_hook_params good = shape(N_LAYER, N_HEAD, HEAD_DIM);
    CHECK(fgdilp_hook_check_params(&good) == FGDILP_OK);
    CHECK(fgdilp_hook_check_params(nullptr) == FGDILP_ERR_ARG);
    struct { const char * what; void (*bend)(fgdilp_hook_params &); int32_t status; } cases[] = {
        {"n_layer 0",          [](fgdilp_hook_params & p) { p.n_layer = 0; }, FGDILP_ERR_ARG},
        {"n_layer > max",      [](fgdilp_hook_params & p) { p.n_layer = FGDILP_MAX_LAYER + 1; p.layer_end = -1; }, FGDILP_ERR_ARG},
        {"n_head 0",           [](fgdilp_hook_params & p) { p.n_head = 0; }, FGDILP_ERR_ARG},
        {"head_dim -1",        [](fgdilp_hook_params & p) { p.head_dim = -1; }, FGDILP_ERR_ARG},
        {"width > INT32_MAX",  [](fgdilp_hook_params & p) { p.n_head = 65536; p.head_dim = 32768; }, FGDILP_ERR_ARG},
        {"n_slots -1",         [](fgdilp_hook_params & p) { p.n_slots = -1; }, FGDILP_ERR_ARG},
        {"n_slots > max",      [](fgdilp_hook_params & p) { p.n_slots = FGDILP_MAX_SLOTS + 1; }, FGDILP_ERR_ARG},
        {"layer_start -1",     [](fgdilp_hook_params & p) { p.layer_start = -1; }, FGDILP_ERR_ARG},
        {"layer_start past",   [](fgdilp_hook_params & p) { p.layer_start = N_LAYER; }, FGDILP_ERR_ARG},
        {"layer_end past",     [](fgdilp_hook_params & p) { p.layer_end = N_LAYER; }, FGDILP_ERR_ARG},
        {"layer_end -2",       [](fgdilp_hook_params & p) { p.layer_end = -2; }, FGDILP_ERR_ARG},
        {"end before start",   [](fgdilp_hook_params & p) { p.layer_start = 2; p.layer_end = 1; }, FGDILP_ERR_ARG},
        {"scale NaN",          [](fgdilp_hook_params & p) { p.scale = NAN; }, FGDILP_ERR_NONFINITE},
        {"scale inf",          [](fgdilp_hook_params & p) { p.scale = INFINITY; }, FGDILP_ERR_NONFINITE},
        {"exp_norm -inf",      [](fgdilp_hook_params & p) { p.exp_norm = -INFINITY; }, FGDILP_ERR_NONFINITE},
        {"exp_sim NaN",        [](fgdilp_hook_params & p) { p.exp_sim = NAN; }, FGDILP_ERR_NONFINITE},
    };
    for (const auto & c : cases) {
        fgdilp_hook_params p = good;
        c.bend(p);
        const int32_t st = fgdilp_hook_check_params(&p);
        if (st != c.status) std::fprintf(stderr, "  case %s: status %d\n", c.what, st);
        CHECK(st == c.status);
        fgdilp_hook * h = fgdilp_hook_init(&p);
        CHECK(h == nullptr);
        fgdilp_hook_free(h);
    }
    // the edges that are allowed: one layer, start = end, zero or negative finite scale, no slots
    fgdilp_hook_params p = shape(1, 1, 1);
    p.n_slots = 0; p.layer_start = 0; p.layer_end = 0; p.scale = -2.0f;
    fgdilp_hook * h = fgdilp_hook_init(&p);
    CHECK(h != nullptr);
    fgdilp_hook_free(h);
    // the C API of the edit refuses a width that overflows int
    float v[1] = {1}, d[1] = {1};
    CHECK(fgdilp_tr_edit_row(v, d, nullptr, 65536, 32768, 0.4f, 0.6f, 1.0f, true) == FGDILP_ERR_ARG);
}

// Every allocation of init failing in turn: NULL each time, nothing leaked (ASan), then success.
static void test_init_alloc_failure() {
    const fgdilp_hook_params p = shape(N_LAYER, N_HEAD, HEAD_DIM);
    int n_failed = 0;
    for (int n = 0; n < 32; ++n) {
        fgdilp_test_fail_alloc_after(n);
        fgdilp_hook * h = fgdilp_hook_init(&p);
        fgdilp_test_fail_alloc_after(-1);
        if (h != nullptr) {
            fgdilp_hook_free(h);
            break;
        }
        ++n_failed;
    }
    CHECK(n_failed >= 4);
}

// set_plan failing on each of its allocations keeps the old plan whole: the next decode runs the
// old plan exactly (ASan would see a half-replaced one read or write out of bounds).
static void test_set_plan_alloc_failure() {
    fgdilp_hook * h = make_tr_hook();
    fgdilp_capture cap = {3, 0};
    fgdilp_edit small = tr_edit(4, 0, 1, 0);
    CHECK(fgdilp_hook_set_plan(h, &cap, 1, &small, 1) == FGDILP_OK);
    fixture ref;
    CHECK(ref.run(h));
    CHECK(fgdilp_hook_end(h) == FGDILP_OK);
    const std::vector<float> want = ref.copy();

    // a bigger plan: more captures, rows and edits than the old one
    fgdilp_capture caps[3] = {{0, 1}, {2, 2}, {4, 0}};
    fgdilp_edit big[2] = {tr_edit(2, 0, 1, -1), tr_edit(3, 4, 1, 1)};
    big[0].n_neg = 3; big[0].neg_rows[1] = 3; big[0].neg_rows[2] = 4;
    int n_failed = 0;
    for (int n = 0; n < 32; ++n) {
        fgdilp_test_fail_alloc_after(n);
        const int32_t rc = fgdilp_hook_set_plan(h, caps, 3, big, 2);
        fgdilp_test_fail_alloc_after(-1);
        if (rc == FGDILP_OK) {
            break;
        }
        CHECK(rc == FGDILP_ERR_ALLOC);
        ++n_failed;
        fixture f;
        CHECK(f.run(h));
        CHECK(fgdilp_hook_end(h) == FGDILP_OK);
        CHECK(fgdilp_hook_edits_applied(h) == N_LAYER);
        CHECK(f.copy() == want);
    }
    CHECK(n_failed >= 5);
    fixture f; // the new plan took effect whole
    CHECK(f.run(h));
    CHECK(fgdilp_hook_end(h) == FGDILP_OK);
    CHECK(fgdilp_hook_edits_applied(h) == 2 * N_LAYER);
    CHECK(f.copy() != want);
    // a refused plan also keeps the old one
    fgdilp_edit bad = tr_edit(1, 0, 2, 9);
    CHECK(fgdilp_hook_set_plan(h, &cap, 1, &bad, 1) == FGDILP_ERR_ARG);
    fixture g;
    CHECK(g.run(h));
    CHECK(fgdilp_hook_end(h) == FGDILP_OK);
    CHECK(fgdilp_hook_edits_applied(h) == 2 * N_LAYER);
    CHECK(g.copy() == f.copy());
    fgdilp_hook_free(h);
}

// A steered row that comes out NaN or inf fails the decode at that layer and is not written.
static void test_nonfinite_steered_row() {
    {   // an inf in a direction slot: lambda_norm = inf
        fgdilp_hook * h = make_hook();
        fixture f;
        const std::vector<float> before = f.copy();
        float * slots = fgdilp_hook_slots(h);
        for (int i = 0; i < N_LAYER * WIDTH; ++i) slots[2 * N_LAYER * WIDTH + i] = 0.5f;
        slots[2 * N_LAYER * WIDTH + 3] = INFINITY; // layer 0, head 0
        fgdilp_edit e = tr_edit(2, -1, -1, -1);
        e.dir_slot = 2; e.n_neg = 0;
        CHECK(fgdilp_hook_set_plan(h, nullptr, 0, &e, 1) == FGDILP_OK);
        CHECK(!f.run(h));
        CHECK(fgdilp_hook_end(h) == FGDILP_ERR_NONFINITE);
        CHECK(std::strstr(fgdilp_hook_last_error(h), "kqv_out-0") != nullptr);
        CHECK(std::strstr(fgdilp_hook_last_error(h), "not finite") != nullptr);
        CHECK(fgdilp_hook_fired_layers(h) == 1);
        CHECK(fgdilp_hook_edits_applied(h) == 0);
        CHECK(f.copy() == before);
        fgdilp_hook_free(h);
    }
    {   // finite inputs, an exponent that overflows double on layer 1 (layer 0 unsteered)
        fgdilp_hook * h = make_tr_hook();
        const float scales[N_LAYER] = {0.0f, 1.0f, 1.0f};
        CHECK(fgdilp_hook_set_layer_scales(h, scales, N_LAYER) == FGDILP_OK);
        CHECK(fgdilp_hook_set_exponents(h, 2000.0f, 0.6f, true) == FGDILP_OK);
        fixture f;
        const std::vector<float> before = f.copy();
        fgdilp_edit e = tr_edit(4, 0, 1, -1);
        CHECK(fgdilp_hook_set_plan(h, nullptr, 0, &e, 1) == FGDILP_OK);
        CHECK(!f.run(h));
        CHECK(fgdilp_hook_end(h) == FGDILP_ERR_NONFINITE);
        CHECK(std::strstr(fgdilp_hook_last_error(h), "kqv_out-1") != nullptr);
        CHECK(fgdilp_hook_fired_layers(h) == 2);
        CHECK(f.copy() == before);
        // the same hook with sane exponents steers the next decode
        CHECK(fgdilp_hook_set_exponents(h, 0.4f, 0.6f, true) == FGDILP_OK);
        fixture g;
        CHECK(g.run(h));
        CHECK(fgdilp_hook_end(h) == FGDILP_OK);
        CHECK(fgdilp_hook_edits_applied(h) == 2);
        fgdilp_hook_free(h);
    }
}

// The decode's n_tokens: begin checks the plan against it, the callback checks every node's rows.
static void test_row_count() {
    fgdilp_hook * h = make_tr_hook();
    fgdilp_edit e = tr_edit(3, 0, 1, -1);
    CHECK(fgdilp_hook_set_plan(h, nullptr, 0, &e, 1) == FGDILP_OK);
    {   fixture f; // 5-row nodes in a decode said to have 4 tokens (e.g. a batch split in ubatches)
        const std::vector<float> before = f.copy();
        CHECK(!f.run_layers(h, {0, 1, 2}, ROWS - 1));
        CHECK(fgdilp_hook_end(h) == FGDILP_ERR_ROW);
        CHECK(std::strstr(fgdilp_hook_last_error(h), "has 5 rows but the decode has 4 tokens") != nullptr);
        CHECK(fgdilp_hook_fired_layers(h) == 0);
        CHECK(f.copy() == before);
    }
    {   fixture f; // more tokens than rows
        CHECK(!f.run_layers(h, {0, 1, 2}, ROWS + 1));
        CHECK(fgdilp_hook_end(h) == FGDILP_ERR_ROW);
    }
    CHECK(fgdilp_hook_begin(h, 3) == FGDILP_ERR_ROW); // the plan names row 3
    CHECK(std::strstr(fgdilp_hook_last_error(h), "row 3") != nullptr);
    {   fixture f; // decoding anyway: the callback asks for nothing and touches nothing
        const std::vector<float> before = f.copy();
        CHECK(!fgdilp_hook_eval_callback(f.layers[0], true, h));
        CHECK(fgdilp_hook_end(h) == FGDILP_ERR_ROW);
        CHECK(f.copy() == before);
    }
    CHECK(fgdilp_hook_begin(h, 0) == FGDILP_ERR_ARG);
    CHECK(fgdilp_hook_begin(h, -5) == FGDILP_ERR_ARG);
    CHECK(fgdilp_hook_begin(nullptr, 5) == FGDILP_ERR_ARG);
    {   fixture f; // a planned decode without begin (end cleared the last one's n_tokens)
        CHECK(f.run(h));
        CHECK(fgdilp_hook_end(h) == FGDILP_OK);
        const std::vector<float> before = f.copy();
        CHECK(fgdilp_hook_eval_callback(f.layers[0], true, h));
        CHECK(!fgdilp_hook_eval_callback(f.layers[0], false, h));
        CHECK(std::strstr(fgdilp_hook_last_error(h), "without fgdilp_hook_begin") != nullptr);
        CHECK(f.copy() == before);
    }
    fgdilp_hook_free(h);
}

// A layer whose kqv_out fires twice in one decode (a graph this hook does not understand).
static void test_layer_fires_twice() {
    fgdilp_hook * h = make_tr_hook();
    fgdilp_capture c = {2, 0};
    CHECK(fgdilp_hook_set_plan(h, &c, 1, nullptr, 0) == FGDILP_OK);
    fixture f;
    CHECK(!f.run_layers(h, {0, 1, 1, 2}));
    CHECK(fgdilp_hook_end(h) == FGDILP_ERR_REFIRED);
    CHECK(std::strstr(fgdilp_hook_last_error(h), "kqv_out-1 fired twice") != nullptr);
    CHECK(fgdilp_hook_fired_layers(h) == 2);
    CHECK(f.run_layers(h, {2, 0, 1})); // any order once each is fine
    CHECK(fgdilp_hook_end(h) == FGDILP_OK);
    fgdilp_hook_free(h);
}

static void test_abort_flag() {
    int32_t flag = 0;
    CHECK(!fgdilp_abort_flag(&flag));
    flag = 1;
    CHECK(fgdilp_abort_flag(&flag));
    CHECK(!fgdilp_abort_flag(nullptr));
}

// The tests of the hook's decode-time work: run on each of its two paths.
static void hook_tests() {
    test_ask_filter();
    test_capture_and_edit();
    test_dir_slot_and_scales();
    test_errors();
    test_fused_edit();
    test_one_negative_default_masks();
    test_fused_edit_nonfinite();
    test_set_plan_alloc_failure();
    test_nonfinite_steered_row();
    test_row_count();
    test_layer_fires_twice();
}

int main() {
    test_abort_flag();
    test_params();
    test_init_refusals();
    test_init_alloc_failure();
    test_edit_math();
    test_fuse_api();
    hook_tests();                           // kqv_out read and written in place (CPU buffers)
    fgdilp_test_force_device_path(true);
    hook_tests();                           // through ggml_backend_tensor_get/set (GPU buffers)
    fgdilp_test_force_device_path(false);
    std::printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail == 0 ? 0 : 1;
}
