//! Which leases to revoke on one GPU so that a more important acquisition
//! fits. Pure: it sees only the candidates' sizes, priorities and
//! generations.
//!
//! Among the sets of candidates that free at least what is needed, the one
//! chosen is the least by, in order:
//! 1. the fewest MiB revoked;
//! 2. the lowest highest priority among the revoked leases;
//! 3. the fewest leases revoked;
//! 4. the newest leases: generations compared from the highest down, the
//!    set whose are higher wins (the work lost is the most recent).
//!
//! The search is exact, branch and bound over the candidates, unless it
//! takes more than the step budget it is given; then the best set found so
//! far is chosen, which still frees enough. No set means nothing is revoked.

use std::cmp::Reverse;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Candidate {
    pub generation: u64,
    pub mb: u64,
    pub priority: i32,
}

/// A set of leases to revoke, ordered by the rules in the module doc.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Victims {
    pub revoked_mib: u64,
    pub highest_priority: i32,
    pub count: usize,
    /// Generations, highest first, reversed so that newer sets sort first.
    pub generations: Reverse<Vec<u64>>,
}

impl Victims {
    pub(super) fn of(chosen: &[Candidate]) -> Self {
        let mut generations: Vec<u64> = chosen.iter().map(|c| c.generation).collect();
        generations.sort_unstable_by(|a, b| b.cmp(a));
        Self {
            revoked_mib: chosen.iter().map(|c| c.mb).sum(),
            highest_priority: chosen.iter().map(|c| c.priority).max().unwrap_or(i32::MIN),
            count: chosen.len(),
            generations: Reverse(generations),
        }
    }

    pub fn generations(&self) -> &[u64] {
        &self.generations.0
    }
}

/// The best set of `candidates` freeing at least `needed_mib`, spending at
/// most `budget` search steps (decremented by what was spent).
pub(super) fn choose(
    mut candidates: Vec<Candidate>,
    needed_mib: u64,
    budget: &mut u64,
) -> Option<Victims> {
    if needed_mib == 0 {
        return Some(Victims::of(&[]));
    }
    if candidates.iter().map(|c| c.mb).sum::<u64>() < needed_mib {
        return None;
    }
    candidates.sort_unstable_by_key(|c| (Reverse(c.mb), c.priority, Reverse(c.generation)));
    let mut remaining: Vec<u64> = vec![0; candidates.len() + 1];
    for i in (0..candidates.len()).rev() {
        remaining[i] = remaining[i + 1] + candidates[i].mb;
    }
    let mut search = Search {
        candidates: &candidates,
        remaining: &remaining,
        needed_mib,
        budget,
        chosen: Vec::new(),
        best: None,
    };
    search.descend(0, 0);
    search.best
}

struct Search<'a> {
    candidates: &'a [Candidate],
    /// `remaining[i]`: the MiB of candidates `i..`.
    remaining: &'a [u64],
    needed_mib: u64,
    budget: &'a mut u64,
    chosen: Vec<Candidate>,
    best: Option<Victims>,
}

impl Search<'_> {
    fn descend(&mut self, next: usize, freed: u64) {
        if freed >= self.needed_mib {
            let found = Victims::of(&self.chosen);
            if self.best.as_ref().is_none_or(|best| found < *best) {
                self.best = Some(found);
            }
            return;
        }
        if next == self.candidates.len() || freed + self.remaining[next] < self.needed_mib {
            return;
        }
        // Adding any candidate frees more than `freed`, so once that is at
        // least the best set's size no completion can beat it.
        if self
            .best
            .as_ref()
            .is_some_and(|best| freed >= best.revoked_mib)
        {
            return;
        }
        if *self.budget == 0 && self.best.is_some() {
            return;
        }
        *self.budget = self.budget.saturating_sub(1);
        self.chosen.push(self.candidates[next]);
        self.descend(next + 1, freed + self.candidates[next].mb);
        self.chosen.pop();
        self.descend(next + 1, freed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(generation: u64, mb: u64, priority: i32) -> Candidate {
        Candidate {
            generation,
            mb,
            priority,
        }
    }

    fn chosen(candidates: Vec<Candidate>, needed: u64) -> Option<Vec<u64>> {
        let mut budget = u64::MAX;
        choose(candidates, needed, &mut budget).map(|v| {
            let mut generations = v.generations().to_vec();
            generations.sort_unstable();
            generations
        })
    }

    #[test]
    fn fewest_mib_wins_over_fewest_leases() {
        let candidates = vec![candidate(1, 10, 0), candidate(2, 6, 0), candidate(3, 5, 0)];
        assert_eq!(chosen(candidates, 11), Some(vec![2, 3]));
    }

    #[test]
    fn equal_mib_revokes_lower_priorities() {
        let candidates = vec![
            candidate(1, 8, 3),
            candidate(2, 8, 1),
            candidate(3, 4, 2),
            candidate(4, 4, 0),
        ];
        assert_eq!(chosen(candidates, 8), Some(vec![2]));
        // The highest priority revoked counts before the number of leases.
        let candidates = vec![candidate(1, 8, 3), candidate(2, 4, 1), candidate(3, 4, 0)];
        assert_eq!(chosen(candidates, 8), Some(vec![2, 3]));
    }

    #[test]
    fn then_fewer_leases_then_newer_ones() {
        let candidates = vec![candidate(1, 8, 0), candidate(2, 4, 0), candidate(3, 4, 0)];
        assert_eq!(chosen(candidates, 8), Some(vec![1]));
        let candidates = vec![candidate(1, 8, 0), candidate(2, 8, 0)];
        assert_eq!(chosen(candidates, 8), Some(vec![2]));
    }

    #[test]
    fn no_set_when_all_together_free_too_little() {
        let candidates = vec![candidate(1, 3, 0), candidate(2, 4, 0)];
        assert_eq!(chosen(candidates, 8), None);
        assert_eq!(chosen(Vec::new(), 1), None);
    }

    #[test]
    fn nothing_needed_revokes_nothing() {
        assert_eq!(chosen(vec![candidate(1, 3, 0)], 0), Some(vec![]));
    }

    #[test]
    fn an_exhausted_budget_still_frees_enough() {
        let candidates: Vec<Candidate> = (1..=40).map(|g| candidate(g, 1 + g % 7, 0)).collect();
        let mut budget = 50;
        let victims = choose(candidates.clone(), 60, &mut budget).unwrap();
        assert!(victims.revoked_mib >= 60);
        let by_generation = |g: u64| candidates.iter().find(|c| c.generation == g).unwrap().mb;
        let freed: u64 = victims
            .generations()
            .iter()
            .map(|g| by_generation(*g))
            .sum();
        assert_eq!(freed, victims.revoked_mib);
    }

    #[test]
    fn the_exact_search_finds_the_smallest_sufficient_sum() {
        let sizes = [13u64, 7, 29, 5, 11, 17, 3];
        let candidates: Vec<Candidate> = sizes
            .iter()
            .enumerate()
            .map(|(i, mb)| candidate(i as u64, *mb, 0))
            .collect();
        for needed in 1..=sizes.iter().sum::<u64>() {
            let smallest = (1u32..(1 << sizes.len()))
                .map(|mask| {
                    (0..sizes.len())
                        .filter(|i| mask & (1 << i) != 0)
                        .map(|i| sizes[i])
                        .sum::<u64>()
                })
                .filter(|sum| *sum >= needed)
                .min()
                .unwrap();
            let mut budget = u64::MAX;
            let victims = choose(candidates.clone(), needed, &mut budget).unwrap();
            assert_eq!(victims.revoked_mib, smallest, "needed {needed}");
        }
    }
}
