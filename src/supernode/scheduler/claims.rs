//! A task's claims: the accounts of its piece digests that hosts gave.
//!
//! The supernode cannot hash a blob, so a piece digest is only a host's word
//! until a blob assembled by it verifies against the task's digest. Every
//! host's pieces follow one claim; hosts that announce conflicting digests
//! are in different claims and nobody is banned for the conflict. A claim has
//! authors (the hosts that published digests in it: its first host, and the
//! task's ingester) and followers (downloaders assigned pieces by it, or
//! hosts whose announcements add nothing to it). A downloader that commits a
//! blob it downloaded by a claim *confirms* it; one whose assembled blob
//! fails refutes it (see `Scheduler::blob_refuted`).

use std::cmp::Reverse;
use std::collections::BTreeMap;

use crate::protocol::Digest;
use crate::supernode::bits::Bits;

/// Claims are numbered per task, never reusing a number.
pub(super) type ClaimId = u32;

/// One account of the blob's piece digests.
pub(super) struct Claim {
    digests: Vec<Option<Digest>>,
    /// Hosts whose pieces follow it.
    pub(super) members: Bits,
    /// Hosts that published digests in it.
    pub(super) authors: Bits,
    /// A downloader committed a blob it downloaded by this claim.
    pub(super) confirmed: bool,
}

impl Claim {
    pub(super) fn digest(&self, number: u32) -> Option<&Digest> {
        self.digests[number as usize].as_ref()
    }

    /// Whether `pieces` agree with it: each digest is the claim's, or (for
    /// an author) the claim has none for that piece yet.
    fn fits(&self, pieces: &[(u32, Digest)], may_author: bool) -> bool {
        pieces
            .iter()
            .all(|(n, d)| match &self.digests[*n as usize] {
                Some(known) => known == d,
                None => may_author,
            })
    }
}

/// The claims of one task.
#[derive(Default)]
pub(super) struct Claims {
    claims: BTreeMap<ClaimId, Claim>,
    next: ClaimId,
}

impl Claims {
    pub(super) fn get(&self, id: ClaimId) -> Option<&Claim> {
        self.claims.get(&id)
    }

    pub(super) fn get_mut(&mut self, id: ClaimId) -> Option<&mut Claim> {
        self.claims.get_mut(&id)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.claims.len()
    }

    #[cfg(test)]
    pub(super) fn iter(&self) -> impl Iterator<Item = (ClaimId, &Claim)> {
        self.claims.iter().map(|(&id, claim)| (id, claim))
    }

    /// Whether host `slot`'s announcement of `pieces` fits `current`, its
    /// claim: it may add digests there only as an author or the ingester.
    pub(super) fn fits(
        &self,
        current: ClaimId,
        slot: u32,
        ingester: bool,
        pieces: &[(u32, Digest)],
    ) -> bool {
        self.claims.get(&current).is_some_and(|claim| {
            let may_author = ingester || claim.authors.contains(slot);
            claim.fits(pieces, may_author)
        })
    }

    /// The oldest claim that already has every digest of `pieces` (a host
    /// that follows none joins it), if any.
    pub(super) fn find(&self, pieces: &[(u32, Digest)]) -> Option<ClaimId> {
        self.claims
            .iter()
            .find(|(_, claim)| claim.fits(pieces, false))
            .map(|(&id, _)| id)
    }

    /// A new claim, knowing no digest of the blob's `piece_count` pieces.
    pub(super) fn create(&mut self, piece_count: usize) -> ClaimId {
        let id = self.next;
        self.next += 1;
        let claim = Claim {
            digests: vec![None; piece_count],
            members: Bits::default(),
            authors: Bits::default(),
            confirmed: false,
        };
        self.claims.insert(id, claim);
        id
    }

    /// A piece whose digest neither claim `target` (none: a new claim)
    /// nor `pieces` gives: a blob announced complete must have none.
    pub(super) fn missing(
        &self,
        target: Option<ClaimId>,
        pieces: &[(u32, Digest)],
        piece_count: u32,
    ) -> Option<u32> {
        let mut known = Bits::default();
        for &(number, _) in pieces {
            known.insert(number);
        }
        let claim = target.and_then(|id| self.claims.get(&id));
        (0..piece_count).find(|&n| {
            !known.contains(n) && claim.is_none_or(|claim| claim.digests[n as usize].is_none())
        })
    }

    /// Records that `slot` follows claim `id` and holds `pieces` by it; a
    /// digest new to the claim makes `slot` one of its authors. The pieces
    /// must fit (see [`Claims::fits`] and [`Claims::place`]).
    pub(super) fn record(&mut self, id: ClaimId, slot: u32, pieces: &[(u32, Digest)]) {
        let claim = self.claims.get_mut(&id).expect("live claim");
        claim.members.insert(slot);
        for (number, digest) in pieces {
            let known = &mut claim.digests[*number as usize];
            if known.is_none() {
                *known = Some(digest.clone());
                claim.authors.insert(slot);
            }
        }
    }

    /// `slot` no longer follows claim `id`; a claim nobody follows is gone.
    pub(super) fn leave(&mut self, id: ClaimId, slot: u32) {
        let Some(claim) = self.claims.get_mut(&id) else {
            return;
        };
        claim.members.remove(slot);
        claim.authors.remove(slot);
        if claim.members.is_empty() {
            self.claims.remove(&id);
        }
    }

    /// Takes claim `id` away.
    pub(super) fn remove(&mut self, id: ClaimId) -> Option<Claim> {
        self.claims.remove(&id)
    }

    /// The claim a downloader is fed by, among those that agree with
    /// `current` (the one it follows) on every piece it `held`s, or any if
    /// it follows none, and that it did not reject: those that `serve` it
    /// (have a holder of a piece it wants) first, then `current`, confirmed
    /// ones, the most followed, the oldest.
    pub(super) fn choose(
        &self,
        current: Option<ClaimId>,
        held: &Bits,
        rejected: &[ClaimId],
        serve: impl Fn(&Claim) -> bool,
    ) -> Option<ClaimId> {
        let current_claim = current.and_then(|id| self.claims.get(&id));
        let agrees = |claim: &Claim| {
            current_claim.is_none_or(|known| {
                held.iter()
                    .all(|n| claim.digests[n as usize] == known.digests[n as usize])
            })
        };
        self.claims
            .iter()
            .filter(|&(id, claim)| !rejected.contains(id) && agrees(claim))
            .max_by_key(|&(&id, claim)| {
                let members = claim.members.iter().count();
                let is_current = current == Some(id);
                (
                    serve(claim),
                    is_current,
                    claim.confirmed,
                    members,
                    Reverse(id),
                )
            })
            .map(|(&id, _)| id)
    }
}
