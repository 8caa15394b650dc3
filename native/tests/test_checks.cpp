// test_checks.cpp - the hook's refusals: init values, allocation failures (strong set_plan),
// steered rows that are not finite, row counts out of step with the decode, a layer firing twice.
#include "fixture.h"

static fgdilp_hook_params shape(int n_layer, int n_head, int head_dim) {
    fgdilp_hook_params p = fgdilp_hook_default_params();
    p.n_layer = n_layer; p.n_head = n_head; p.head_dim = head_dim; p.n_slots = 3;
    return p;
}

// fgdilp_hook_init refuses what fgdilp_hook_check_params refuses, with the reason in the status.
void test_init_refusals() {
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
void test_init_alloc_failure() {
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
void test_set_plan_alloc_failure() {
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
void test_nonfinite_steered_row() {
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
void test_row_count() {
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
void test_layer_fires_twice() {
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
