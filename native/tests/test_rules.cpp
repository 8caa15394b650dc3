// test_rules.cpp - the edit rules of docs/method.md §2.6-2.7 and §5.6: rotate, the gate, per-head
// strengths, and the fused delta rescaled to the mean delta's norm.
#include "fixture.h"

#include <algorithm>

static double dotd(const float * a, const float * b, int n) {
    double s = 0; for (int i = 0; i < n; ++i) s += (double) a[i] * b[i]; return s;
}

static fgdilp_edit_params rule(int32_t r, bool gated = false, float gate = 0.0f) {
    fgdilp_edit_params p = fgdilp_edit_default_params();
    p.rule = r; p.gated = gated; p.gate = gate;
    return p;
}

// Sample row, delta, e of WIDTH (heads differ in how far they point along the delta).
struct row3 {
    std::vector<float> v, d, e;
    row3() : v(WIDTH), d(WIDTH), e(WIDTH) {
        for (int i = 0; i < WIDTH; ++i) {
            d[i] = std::cos(0.9f * i) + 0.2f;
            e[i] = std::sin(0.3f * i);
            const int h = i / HEAD_DIM;  // head h: v = (h - 1.5) * d + noise
            v[i] = (float) (h - 1.5) * d[i] + 0.3f * std::sin(2.1f * i);
        }
    }
};

void test_edit_rule_math() {
    const row3 r;
    // TR through fgdilp_edit_row with every head edited: the bits of fgdilp_tr_edit_row
    std::vector<float> a = r.v, b = r.v;
    const fgdilp_edit_params tr = rule(FGDILP_EDIT_TR);
    CHECK(fgdilp_edit_row(a.data(), r.d.data(), r.e.data(), nullptr, N_HEAD, HEAD_DIM, &tr) == N_HEAD);
    CHECK(fgdilp_tr_edit_row(b.data(), r.d.data(), r.e.data(), N_HEAD, HEAD_DIM, 0.4f, 0.6f, 1.0f, true) == FGDILP_OK);
    CHECK(std::memcmp(a.data(), b.data(), sizeof(float) * WIDTH) == 0);

    // rotate: each head keeps its norm and turns away from delta
    std::vector<float> rot = r.v;
    const fgdilp_edit_params ro = rule(FGDILP_EDIT_ROTATE);
    CHECK(fgdilp_edit_row(rot.data(), r.d.data(), r.e.data(), nullptr, N_HEAD, HEAD_DIM, &ro) == N_HEAD);
    for (int h = 0; h < N_HEAD; ++h) {
        const float * v0 = &r.v[h * HEAD_DIM], * v1 = &rot[h * HEAD_DIM], * dh = &r.d[h * HEAD_DIM];
        CHECK(std::fabs(norm(v1, HEAD_DIM) - norm(v0, HEAD_DIM)) < 1e-5 * norm(v0, HEAD_DIM));
        CHECK(dotd(v1, dh, HEAD_DIM) / norm(v1, HEAD_DIM) < dotd(v0, dh, HEAD_DIM) / norm(v0, HEAD_DIM));
    }
    // a zero head (v or delta) is left alone by rotate
    std::vector<float> z = r.v, dz = r.d;
    std::fill(z.begin(), z.begin() + HEAD_DIM, 0.0f);
    std::fill(dz.begin() + HEAD_DIM, dz.begin() + 2 * HEAD_DIM, 0.0f);
    CHECK(fgdilp_edit_row(z.data(), dz.data(), nullptr, nullptr, N_HEAD, HEAD_DIM, &ro) == N_HEAD - 2);
    CHECK(std::memcmp(z.data() + HEAD_DIM, r.v.data() + HEAD_DIM, sizeof(float) * HEAD_DIM) == 0);

    // gate: heads 0, 1 point against delta (cos < 0), heads 2, 3 along it; theta 0 edits 2 and 3 only
    for (int32_t rr : {FGDILP_EDIT_TR, FGDILP_EDIT_ROTATE}) {
        std::vector<float> g = r.v;
        const fgdilp_edit_params gp = rule(rr, true, 0.0f);
        CHECK(fgdilp_edit_row(g.data(), r.d.data(), r.e.data(), nullptr, N_HEAD, HEAD_DIM, &gp) == 2);
        CHECK(std::memcmp(g.data(), r.v.data(), sizeof(float) * 2 * HEAD_DIM) == 0);    // bit for bit
        CHECK(std::memcmp(g.data() + 2 * HEAD_DIM, r.v.data() + 2 * HEAD_DIM, sizeof(float) * HEAD_DIM) != 0);
        if (rr == FGDILP_EDIT_TR) { // renorm: the two edited heads keep their joint norm
            CHECK(std::fabs(norm(g.data() + 2 * HEAD_DIM, 2 * HEAD_DIM) - norm(r.v.data() + 2 * HEAD_DIM, 2 * HEAD_DIM)) < 1e-5);
        }
        // per-head strengths: 0 leaves head 3 as it is
        const float hs[N_HEAD] = {1.0f, 1.0f, 2.0f, 0.0f};
        std::vector<float> s = r.v;
        const fgdilp_edit_params sp = rule(rr);
        CHECK(fgdilp_edit_row(s.data(), r.d.data(), r.e.data(), hs, N_HEAD, HEAD_DIM, &sp) == 3);
        CHECK(std::memcmp(s.data() + 3 * HEAD_DIM, r.v.data() + 3 * HEAD_DIM, sizeof(float) * HEAD_DIM) == 0);
    }
    // refusals
    std::vector<float> x = r.v;
    fgdilp_edit_params bad = rule(7);
    CHECK(fgdilp_edit_row(x.data(), r.d.data(), nullptr, nullptr, N_HEAD, HEAD_DIM, &bad) == FGDILP_ERR_ARG);
    CHECK(fgdilp_edit_row(x.data(), r.d.data(), nullptr, nullptr, N_HEAD, HEAD_DIM, nullptr) == FGDILP_ERR_ARG);
    CHECK(fgdilp_edit_row(nullptr, r.d.data(), nullptr, nullptr, N_HEAD, HEAD_DIM, &tr) == FGDILP_ERR_ARG);
    CHECK(fgdilp_edit_row(x.data(), r.d.data(), nullptr, nullptr, 65536, 32768, &tr) == FGDILP_ERR_ARG);
    CHECK(std::memcmp(x.data(), r.v.data(), sizeof(float) * WIDTH) == 0);
}

void test_rule_setters() {
    fgdilp_hook * h = make_hook();
    CHECK(fgdilp_hook_set_edit_rule(h, FGDILP_EDIT_ROTATE) == FGDILP_OK);
    CHECK(fgdilp_hook_set_edit_rule(h, 2) == FGDILP_ERR_ARG);
    CHECK(fgdilp_hook_set_edit_rule(nullptr, FGDILP_EDIT_TR) == FGDILP_ERR_ARG);
    CHECK(fgdilp_hook_set_gate(h, true, NAN) == FGDILP_ERR_NONFINITE);
    CHECK(fgdilp_hook_set_gate(h, true, INFINITY) == FGDILP_ERR_NONFINITE);
    CHECK(fgdilp_hook_set_gate(h, true, 1.0f) == FGDILP_ERR_ARG);    // cos > 1 never: nothing steered
    CHECK(fgdilp_hook_set_gate(h, true, -1.5f) == FGDILP_ERR_ARG);
    CHECK(fgdilp_hook_set_gate(h, true, -1.0f) == FGDILP_OK);
    CHECK(fgdilp_hook_set_gate(h, false, NAN) == FGDILP_OK);         // off: theta unused
    std::vector<float> hs(N_LAYER * N_HEAD, 0.5f);
    CHECK(fgdilp_hook_set_head_scales(h, hs.data(), N_LAYER * N_HEAD - 1) == FGDILP_ERR_ARG);
    CHECK(fgdilp_hook_set_head_scales(h, hs.data(), -1) == FGDILP_ERR_ARG);
    hs[3] = -0.5f;
    CHECK(fgdilp_hook_set_head_scales(h, hs.data(), N_LAYER * N_HEAD) == FGDILP_ERR_ARG);
    hs[3] = NAN;
    CHECK(fgdilp_hook_set_head_scales(h, hs.data(), N_LAYER * N_HEAD) == FGDILP_ERR_NONFINITE);
    hs[3] = 0.0f;
    CHECK(fgdilp_hook_set_head_scales(h, hs.data(), N_LAYER * N_HEAD) == FGDILP_OK);
    CHECK(fgdilp_hook_set_head_scales(h, nullptr, 0) == FGDILP_OK);  // back to all 1
    CHECK(fgdilp_hook_set_head_scales(nullptr, nullptr, 0) == FGDILP_ERR_ARG);
    // the fused-norm rescale needs the hook's own head count
    fgdilp_fusion_params fp = fgdilp_fusion_default_params();
    CHECK(fp.norm_heads == 0);
    fp.norm_heads = N_HEAD;
    CHECK(fgdilp_hook_set_fusion(h, &fp) == FGDILP_OK);
    fp.norm_heads = 2;
    CHECK(fgdilp_hook_set_fusion(h, &fp) == FGDILP_ERR_ARG);
    fp.norm_heads = -1;
    CHECK(fgdilp_hook_set_fusion(h, &fp) == FGDILP_ERR_ARG);
    std::vector<float> d(2 * WIDTH, 1.0f), out(WIDTH);
    fp.norm_heads = 5;                                               // 32 % 5 != 0
    CHECK(fgdilp_fuse(d.data(), 2, WIDTH, &fp, out.data()) == FGDILP_ERR_ARG);
    fgdilp_hook_free(h);
}

// --fused-norm mean-delta: each head of the fused row has the norm of the mean delta's head.
void test_fuse_norm_heads() {
    std::vector<float> d(3 * WIDTH), plain(WIDTH), scaled(WIDTH), mean(WIDTH, 0.0f);
    for (int i = 0; i < 3 * WIDTH; ++i) d[i] = std::sin(0.7f * i) * (1.0f + (float) (i / WIDTH));
    for (int j = 0; j < 3; ++j) for (int i = 0; i < WIDTH; ++i) mean[i] += d[j * WIDTH + i] / 3.0f;
    fgdilp_fusion_params fp = fgdilp_fusion_default_params();
    CHECK(fgdilp_fuse(d.data(), 3, WIDTH, &fp, plain.data()) == FGDILP_OK);
    fp.norm_heads = N_HEAD;
    CHECK(fgdilp_fuse(d.data(), 3, WIDTH, &fp, scaled.data()) == FGDILP_OK);
    for (int h = 0; h < N_HEAD; ++h) {
        const float * p = &plain[h * HEAD_DIM], * s = &scaled[h * HEAD_DIM];
        CHECK(std::fabs(norm(s, HEAD_DIM) - norm(&mean[h * HEAD_DIM], HEAD_DIM)) < 1e-5 * norm(&mean[h * HEAD_DIM], HEAD_DIM));
        // the same direction: a positive multiple of the plain fusion
        CHECK(dotd(p, s, HEAD_DIM) > 0.99999 * norm(p, HEAD_DIM) * norm(s, HEAD_DIM));
    }
    // one delta, K = 100: the fusion is the delta, so the rescale keeps it (to rounding)
    fp.k_pct = 100.0f;
    CHECK(fgdilp_fuse(d.data(), 1, WIDTH, &fp, scaled.data()) == FGDILP_OK);
    for (int i = 0; i < WIDTH; ++i) CHECK(std::fabs(scaled[i] - d[i]) <= 1e-6f * (1.0f + std::fabs(d[i])));
}

// Per layer: the fused delta of the hook test's edit (P+ row 0, P- rows 1..3), from the rows before.
static std::vector<float> fused_rows(const std::vector<float> & before, const fgdilp_fusion_params & fp) {
    std::vector<float> out((size_t) N_LAYER * WIDTH);
    for (int il = 0; il < N_LAYER; ++il) {
        const float * b = &before[(size_t) il * WIDTH * ROWS];
        std::vector<float> deltas(3 * WIDTH);
        for (int j = 0; j < 3; ++j)
            for (int i = 0; i < WIDTH; ++i) deltas[j * WIDTH + i] = b[(1 + j) * WIDTH + i] - b[i];
        CHECK(fgdilp_fuse(deltas.data(), 3, WIDTH, &fp, &out[(size_t) il * WIDTH]) == FGDILP_OK);
    }
    return out;
}

// The hook runs the rules as fgdilp_edit_row does, on both buffer paths.
void test_hook_rules() {
    for (int32_t rr : {FGDILP_EDIT_TR, FGDILP_EDIT_ROTATE}) {
        fgdilp_hook * h = make_hook();
        fixture f;
        const std::vector<float> before = f.copy();
        fgdilp_fusion_params fp = fgdilp_fusion_default_params();
        fp.norm_heads = N_HEAD;
        const std::vector<float> fused = fused_rows(before, fp);
        // theta between the 6th and 7th of the 12 cos(v_h, delta_h): the gate shuts half the heads
        std::vector<double> cos;
        for (int il = 0; il < N_LAYER; ++il)
            for (int hh = 0; hh < N_HEAD; ++hh) {
                const float * fh = &fused[(size_t) il * WIDTH + hh * HEAD_DIM];
                const float * vh = &before[(size_t) il * WIDTH * ROWS + 4 * WIDTH + hh * HEAD_DIM];
                cos.push_back(dotd(vh, fh, HEAD_DIM) / (norm(vh, HEAD_DIM) * norm(fh, HEAD_DIM)));
            }
        std::vector<double> sorted = cos;
        std::sort(sorted.begin(), sorted.end());
        const float theta = (float) (0.5 * (sorted[5] + sorted[6]));
        CHECK(fgdilp_hook_set_fusion(h, &fp) == FGDILP_OK);
        CHECK(fgdilp_hook_set_edit_rule(h, rr) == FGDILP_OK);
        CHECK(fgdilp_hook_set_gate(h, true, theta) == FGDILP_OK);
        std::vector<float> hs(N_LAYER * N_HEAD, 1.0f);
        hs[N_HEAD + 2] = 0.5f;                                    // layer 1 head 2 halved
        const int off = (int) (std::max_element(cos.begin(), cos.end()) - cos.begin());
        hs[off] = 0.0f;                                           // the head surest to pass the gate: off
        CHECK(fgdilp_hook_set_head_scales(h, hs.data(), (int32_t) hs.size()) == FGDILP_OK);
        fgdilp_capture cap = {3, 0};
        fgdilp_edit e = tr_edit(4, 0, 1, 0);
        e.n_neg = 3; e.neg_rows[1] = 2; e.neg_rows[2] = 3;
        CHECK(fgdilp_hook_set_plan(h, &cap, 1, &e, 1) == FGDILP_OK);
        CHECK(f.run(h));
        CHECK(fgdilp_hook_end(h) == FGDILP_OK);
        int expected_heads = 0;
        for (int il = 0; il < N_LAYER; ++il) {
            const float * b = &before[(size_t) il * WIDTH * ROWS];
            std::vector<float> v(b + 4 * WIDTH, b + 5 * WIDTH);
            const fgdilp_edit_params ep = rule(rr, true, theta);
            expected_heads += fgdilp_edit_row(v.data(), &fused[(size_t) il * WIDTH], b + 3 * WIDTH, &hs[il * N_HEAD],
                                              N_HEAD, HEAD_DIM, &ep);
            CHECK(std::memcmp(f.row(il, 4), v.data(), sizeof(float) * WIDTH) == 0);
            CHECK(std::memcmp(f.row(il, 0), b, sizeof(float) * WIDTH * 4) == 0);
            for (int hh = 0; hh < N_HEAD; ++hh) { // a head not edited keeps its bits, an edited one changes
                const int k = il * N_HEAD + hh;
                const float * vh = b + 4 * WIDTH + hh * HEAD_DIM;
                const bool same = std::memcmp(f.row(il, 4) + hh * HEAD_DIM, vh, sizeof(float) * HEAD_DIM) == 0;
                CHECK(same == (!(cos[k] > theta) || hs[k] == 0.0f));
            }
        }
        CHECK(fgdilp_hook_heads_edited(h) == expected_heads);
        CHECK(expected_heads == 5); // 6 heads pass the gate, one of them at strength 0
        // a gate no head passes: the decode leaves every row as it was
        fixture g;
        const std::vector<float> gb = g.copy();
        CHECK(fgdilp_hook_set_gate(h, true, (float) sorted.back() + 1e-6f) == FGDILP_OK);
        CHECK(g.run(h));
        CHECK(fgdilp_hook_end(h) == FGDILP_OK);
        CHECK(fgdilp_hook_heads_edited(h) == 0);
        CHECK(fgdilp_hook_edits_applied(h) == N_LAYER);
        CHECK(g.copy() == gb);
        fgdilp_hook_free(h);
    }
}
