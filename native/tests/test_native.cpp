// test_native.cpp - the hook against synthetic kqv_out tensors (run under ASan by `make asan`).
#include "fgdilp.h"
#include "ggml.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

static int g_pass = 0, g_fail = 0;
#define CHECK(cond)                                                          \
    do {                                                                     \
        if (cond) { ++g_pass; }                                              \
        else { ++g_fail; std::fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); } \
    } while (0)

static const int N_LAYER = 3, N_HEAD = 4, HEAD_DIM = 8, WIDTH = N_HEAD * HEAD_DIM, ROWS = 5;

struct fixture {
    ggml_context * ctx = nullptr;
    std::vector<ggml_tensor *> layers;
    fixture(ggml_type type = GGML_TYPE_F32, int width = WIDTH, ggml_op op = GGML_OP_CONT) {
        ggml_init_params ip = {64 * 1024 * 1024, nullptr, false};
        ctx = ggml_init(ip);
        for (int il = 0; il < N_LAYER; ++il) {
            ggml_tensor * t = ggml_new_tensor_2d(ctx, type, width, ROWS);
            ggml_format_name(t, "kqv_out-%d", il);
            t->op = op;
            if (type == GGML_TYPE_F32) {
                float * d = (float *) t->data;
                for (int i = 0; i < width * ROWS; ++i) {
                    d[i] = std::sin(0.37f * i + 1.3f * il) + 0.1f * (float) (i % 7);
                }
            }
            layers.push_back(t);
        }
    }
    ~fixture() { ggml_free(ctx); }
    float * row(int il, int r) { return (float *) layers[il]->data + (size_t) r * WIDTH; }
    // what the scheduler does: ask, then call for the asked nodes
    void run(fgdilp_hook * h, int n_layers = N_LAYER) {
        fgdilp_hook_begin(h);
        for (int il = 0; il < n_layers; ++il) {
            if (fgdilp_hook_eval_callback(layers[il], true, h)) {
                CHECK(fgdilp_hook_eval_callback(layers[il], false, h));
            }
        }
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
    f.run(h);
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
    f.run(h);
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
        f.run(h, 1);
        CHECK(fgdilp_hook_end(h) == FGDILP_ERR_NOT_FIRED);
        CHECK(std::strstr(fgdilp_hook_last_error(h), "1 of 3") != nullptr);
        fgdilp_hook_begin(h);
        CHECK(fgdilp_hook_end(h) == FGDILP_ERR_NOT_FIRED); // nothing fired at all
    }
    {   fixture f(GGML_TYPE_F16);
        f.run(h);
        CHECK(fgdilp_hook_end(h) == FGDILP_ERR_TENSOR);
    }
    {   fixture f(GGML_TYPE_F32, WIDTH + HEAD_DIM);
        f.run(h);
        CHECK(fgdilp_hook_end(h) == FGDILP_ERR_TENSOR);
    }
    {   fixture f(GGML_TYPE_F32, WIDTH, GGML_OP_MUL_MAT); // e.g. an output already projected by W_O
        f.run(h);
        CHECK(fgdilp_hook_end(h) == FGDILP_ERR_TENSOR);
    }
    {   fixture f;
        fgdilp_edit far = tr_edit(ROWS, 0, 1, 0);
        CHECK(fgdilp_hook_set_plan(h, nullptr, 0, &far, 1) == FGDILP_OK);
        f.run(h);
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
        f.run(h);
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
    f.run(h);
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

// NaN in a negative row of one layer: that layer's edit is skipped and reported; the others run.
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
    std::vector<float> l1(f.row(1, 0), f.row(1, 0) + WIDTH * ROWS), l0(f.row(0, 4), f.row(0, 4) + WIDTH);
    fgdilp_edit e = tr_edit(4, 0, 1, -1);
    e.n_neg = 2; e.neg_rows[1] = 2;
    CHECK(fgdilp_hook_set_plan(h, nullptr, 0, &e, 1) == FGDILP_OK);
    f.run(h);
    CHECK(fgdilp_hook_end(h) == FGDILP_ERR_NONFINITE);
    CHECK(std::strstr(fgdilp_hook_last_error(h), "kqv_out-1") != nullptr);
    CHECK(fgdilp_hook_fired_layers(h) == N_LAYER);
    CHECK(fgdilp_hook_edits_applied(h) == N_LAYER - 1);
    CHECK(std::memcmp(f.row(1, 4), &l1[4 * WIDTH], sizeof(float) * WIDTH) == 0); // layer 1 untouched
    CHECK(std::memcmp(f.row(0, 4), l0.data(), sizeof(float) * WIDTH) != 0);      // layer 0 edited
    fgdilp_hook_free(h);
}

static void test_abort_flag() {
    int32_t flag = 0;
    CHECK(!fgdilp_abort_flag(&flag));
    flag = 1;
    CHECK(fgdilp_abort_flag(&flag));
    CHECK(!fgdilp_abort_flag(nullptr));
}

int main() {
    test_abort_flag();
    test_params();
    test_ask_filter();
    test_capture_and_edit();
    test_edit_math();
    test_dir_slot_and_scales();
    test_errors();
    test_fuse_api();
    test_fused_edit();
    test_one_negative_default_masks();
    test_fused_edit_nonfinite();
    std::printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail == 0 ? 0 : 1;
}
