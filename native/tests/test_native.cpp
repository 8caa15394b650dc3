// test_native.cpp - the hook against synthetic kqv_out tensors (run under ASan by `make asan`).
// Linked against the FGDILP_TESTING build of the sources: every hook test runs twice, once reading
// kqv_out in place (CPU) and once through ggml_backend_tensor_get/set (the GPU path).
// The refusals and per-decode checks of issue 12 are in test_checks.cpp, the edit rules in test_rules.cpp.
#include "fixture.h"

int g_pass = 0, g_fail = 0;

void test_init_refusals();
void test_init_alloc_failure();
void test_set_plan_alloc_failure();
void test_nonfinite_steered_row();
void test_row_count();
void test_layer_fires_twice();
void test_edit_rule_math();
void test_rule_setters();
void test_fuse_norm_heads();
void test_hook_rules();

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
    test_hook_rules();
}

int main() {
    test_abort_flag();
    test_params();
    test_init_refusals();
    test_init_alloc_failure();
    test_edit_math();
    test_fuse_api();
    test_edit_rule_math();
    test_rule_setters();
    test_fuse_norm_heads();
    hook_tests();                           // kqv_out read and written in place (CPU buffers)
    fgdilp_test_force_device_path(true);
    hook_tests();                           // through ggml_backend_tensor_get/set (GPU buffers)
    fgdilp_test_force_device_path(false);
    std::printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail == 0 ? 0 : 1;
}
