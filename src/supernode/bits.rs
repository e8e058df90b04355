//! A growable bitset over small indices (host slots, piece numbers): the
//! compact form of "which hosts hold piece N" and "which pieces host H holds"
//! in the scheduler. 10,000 hosts cost 1.25 KiB per piece.

/// A set of `u32`s stored one bit each; it grows to the largest member.
#[derive(Debug, Clone, Default)]
pub(crate) struct Bits {
    words: Vec<u64>,
}

impl Bits {
    /// Whether `index` is in the set.
    pub(crate) fn contains(&self, index: u32) -> bool {
        let (word, bit) = split(index);
        self.words.get(word).is_some_and(|w| w & bit != 0)
    }

    /// Adds `index`; true if it was not in the set yet.
    pub(crate) fn insert(&mut self, index: u32) -> bool {
        let (word, bit) = split(index);
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        let added = self.words[word] & bit == 0;
        self.words[word] |= bit;
        added
    }

    /// Removes `index`; true if it was in the set.
    pub(crate) fn remove(&mut self, index: u32) -> bool {
        let (word, bit) = split(index);
        let Some(w) = self.words.get_mut(word) else {
            return false;
        };
        let removed = *w & bit != 0;
        *w &= !bit;
        removed
    }

    /// Adds every member of `other`.
    pub(crate) fn union_with(&mut self, other: &Bits) {
        if other.words.len() > self.words.len() {
            self.words.resize(other.words.len(), 0);
        }
        for (word, &theirs) in self.words.iter_mut().zip(&other.words) {
            *word |= theirs;
        }
    }

    /// Keeps only the members that are also in `other`.
    pub(crate) fn intersect_with(&mut self, other: &Bits) {
        for (index, word) in self.words.iter_mut().enumerate() {
            *word &= other.words.get(index).copied().unwrap_or(0);
        }
    }

    /// Whether the set has no member.
    pub(crate) fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The members, in increasing order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &word)| {
            let base = (i * 64) as u32;
            BitsOf(word).map(move |bit| base + bit)
        })
    }

    /// The first member of both `self` and `other` that `accept`s, searching
    /// from `start` upwards and then wrapping around to the members below
    /// `start`: a round-robin scan of the intersection, one word at a time.
    pub(crate) fn next_common(
        &self,
        other: &Bits,
        start: u32,
        mut accept: impl FnMut(u32) -> bool,
    ) -> Option<u32> {
        let len = self.words.len().min(other.words.len());
        if len == 0 {
            return None;
        }
        let start = if (start as usize) < len * 64 {
            start
        } else {
            0
        };
        let (first, bit) = split(start);
        let at_or_above_start = !(bit - 1);
        // Word `first` is visited twice: its bits from `start` up at step 0,
        // its bits below `start` at step `len`, after the wrap-around.
        for step in 0..=len {
            let i = (first + step) % len;
            let mut word = self.words[i] & other.words[i];
            if step == 0 {
                word &= at_or_above_start;
            } else if step == len {
                word &= !at_or_above_start;
            }
            let base = (i * 64) as u32;
            if let Some(found) = BitsOf(word).map(|b| base + b).find(|&m| accept(m)) {
                return Some(found);
            }
        }
        None
    }
}

/// Word index and bit mask of `index`.
fn split(index: u32) -> (usize, u64) {
    ((index / 64) as usize, 1u64 << (index % 64))
}

/// The positions of the set bits of one word, lowest first.
struct BitsOf(u64);

impl Iterator for BitsOf {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let bit = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(members: &[u32]) -> Bits {
        let mut bits = Bits::default();
        for &m in members {
            bits.insert(m);
        }
        bits
    }

    #[test]
    fn insert_remove_contains_iter() {
        let mut bits = of(&[3, 64, 200]);
        assert!(bits.contains(64) && !bits.contains(65) && !bits.contains(10_000));
        assert!(!bits.insert(3));
        assert!(bits.remove(64) && !bits.remove(64) && !bits.remove(9_999));
        assert_eq!(bits.iter().collect::<Vec<_>>(), [3, 200]);
        let mut union = of(&[1]);
        union.union_with(&bits);
        assert_eq!(union.iter().collect::<Vec<_>>(), [1, 3, 200]);
        let mut common = of(&[1, 3, 70, 200, 300]);
        common.intersect_with(&of(&[3, 200]));
        assert_eq!(common.iter().collect::<Vec<_>>(), [3, 200]);
        bits.remove(3);
        bits.remove(200);
        assert!(bits.is_empty());
    }

    #[test]
    fn next_common_scans_round_robin_from_start() {
        let a = of(&[1, 5, 70, 130, 131]);
        let b = of(&[1, 5, 70, 131, 300]);
        let all = |_| true;
        assert_eq!(a.next_common(&b, 0, all), Some(1));
        assert_eq!(a.next_common(&b, 2, all), Some(5));
        assert_eq!(a.next_common(&b, 71, all), Some(131));
        // Past the last common member it wraps around to the first.
        assert_eq!(a.next_common(&b, 132, all), Some(1));
        // A start beyond both sets starts from zero.
        assert_eq!(a.next_common(&b, 5_000, all), Some(1));
        assert_eq!(a.next_common(&b, 6, |m| m != 70 && m != 131), Some(1));
        assert_eq!(a.next_common(&b, 0, |_| false), None);
        assert_eq!(a.next_common(&Bits::default(), 0, all), None);
    }
}
