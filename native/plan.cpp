// plan.cpp - validate a hook plan and lay it out for the eval callback (fgdilp_hook_set_plan).
//
// Everything is built in a local plan_state that the caller moves into the hook only on success,
// so a refused plan or a failed allocation leaves the previous plan whole (strong guarantee).
#include "fgdilp.h"
#include "internal.h"

#include <algorithm>
#include <exception>

namespace fgdilp {

static bool plan_ok(const fgdilp_capture * captures, int32_t n_captures, const fgdilp_edit * edits,
                    int32_t n_edits, int32_t n_slots) {
    for (int32_t i = 0; i < n_captures; ++i) {
        if (captures[i].row < 0 || captures[i].slot < 0 || captures[i].slot >= n_slots) {
            return false;
        }
    }
    for (int32_t i = 0; i < n_edits; ++i) {
        const fgdilp_edit & e = edits[i];
        if (e.target_row < 0 || e.e_slot >= n_slots || e.dir_slot >= n_slots) {
            return false;
        }
        if (e.dir_slot < 0) {
            // rows: one positive and 1..FGDILP_MAX_NEG negative rows, fused
            if (e.pos_row < 0 || e.n_neg < 1 || e.n_neg > FGDILP_MAX_NEG) {
                return false;
            }
            for (int32_t j = 0; j < e.n_neg; ++j) {
                if (e.neg_rows[j] < 0) {
                    return false;
                }
            }
        }
    }
    return true;
}

// Place of row r in the ascending distinct rows (r is known to be there).
static int32_t place_of(const std::vector<int32_t> & rows, int32_t r) {
    return (int32_t) (std::lower_bound(rows.begin(), rows.end(), r) - rows.begin());
}

int32_t compile_plan(const fgdilp_capture * captures, int32_t n_captures, const fgdilp_edit * edits,
                     int32_t n_edits, int32_t n_slots, size_t width, plan_state & out) {
    if (n_captures < 0 || n_edits < 0 || (n_captures > 0 && captures == nullptr) ||
        (n_edits > 0 && edits == nullptr) || !plan_ok(captures, n_captures, edits, n_edits, n_slots)) {
        return FGDILP_ERR_ARG;
    }
    plan_state next;
    try {
        alloc_checkpoint();
        next.captures.assign(captures, captures + n_captures);
        alloc_checkpoint();
        next.edits.assign(edits, edits + n_edits);
        alloc_checkpoint();
        for (const fgdilp_capture & c : next.captures) {
            next.rows.push_back(c.row);
        }
        for (const fgdilp_edit & e : next.edits) {
            next.rows.push_back(e.target_row);
            if (e.dir_slot < 0) {
                next.rows.push_back(e.pos_row);
                next.rows.insert(next.rows.end(), e.neg_rows, e.neg_rows + e.n_neg);
            }
        }
        std::sort(next.rows.begin(), next.rows.end());
        next.rows.erase(std::unique(next.rows.begin(), next.rows.end()), next.rows.end());
        next.max_row = next.rows.empty() ? -1 : next.rows.back();

        alloc_checkpoint();
        next.capture_place.resize(next.captures.size());
        for (size_t i = 0; i < next.captures.size(); ++i) {
            next.capture_place[i] = place_of(next.rows, next.captures[i].row);
        }
        alloc_checkpoint();
        next.edit_place.resize(next.edits.size());
        for (size_t k = 0; k < next.edits.size(); ++k) {
            const fgdilp_edit & e = next.edits[k];
            edit_places & p = next.edit_place[k];
            p.target = place_of(next.rows, e.target_row);
            p.pos    = e.dir_slot < 0 ? place_of(next.rows, e.pos_row) : -1;
            for (int32_t j = 0; j < FGDILP_MAX_NEG; ++j) {
                p.neg[j] = e.dir_slot < 0 && j < e.n_neg ? place_of(next.rows, e.neg_rows[j]) : -1;
            }
        }
        // sizes in size_t: rows and edits are int32 counts, width <= INT32_MAX
        alloc_checkpoint();
        next.row_buf.resize(next.rows.size() * width);
        alloc_checkpoint();
        next.out_buf.resize(next.edits.size() * width);
    } catch (const std::exception &) { // bad_alloc, or length_error for a size past max_size()
        return FGDILP_ERR_ALLOC;
    }
    out = std::move(next); // vectors move without allocating: cannot throw
    return FGDILP_OK;
}

} // namespace fgdilp
