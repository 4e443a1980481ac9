//! What a tree holds, as a map from path to entry (with the inode it had), and the pure
//! comparison of two such views into the changes that turn one into the other: entries to
//! create or update, entries to remove, and renames (of files and whole directories), found by
//! inode, so that moving a big directory costs a rename rather than its contents.
//!
//! A [`ChangeSet`] is applied in a fixed order, which [`ChangeSet::apply`] models and the
//! receiver follows on disk:
//! 1. `stash`: every entry that moves is parked under a name of its own at the root (so two
//!    entries can trade places and a directory can move into what another vacates);
//! 2. `place`: the parked entries are put where they belong, outer destinations first; missing
//!    parents are made (a non-directory in their way is replaced) and what is at the
//!    destination is replaced;
//! 3. `upserts`, parents before children: created or updated (a directory replaced by a file
//!    loses what was below it);
//! 4. `removes`: what is gone, each with everything under it.
//!
//! Pure: no I/O.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{Entry, EntryKind, Mtime, RelPath};

/// `(device, inode)`; `(0, 0)` when unknown (never matches anything as a rename).
pub type Ino = (u64, u64);

/// An entry and the inode it is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Indexed {
    pub entry: Entry,
    pub ino: Ino,
}

/// A tree's entries by path (sorted, so a directory's subtree is a contiguous range).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Index {
    map: BTreeMap<RelPath, Indexed>,
}

/// What turns one view of a tree into another.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeSet {
    /// `(from, parking name)` for each entry that moves, in order (a source inside one parked
    /// before it is named inside the parked one).
    pub stash: Vec<(RelPath, RelPath)>,
    /// `(parking name, to)`, outer destinations first; what is at `to` is replaced.
    pub place: Vec<(RelPath, RelPath)>,
    /// Parents before children.
    pub upserts: Vec<Entry>,
    /// Each with everything under it; none inside another.
    pub removes: Vec<RelPath>,
    /// The moves as the user made them, `(old path, new path)` (for reporting).
    pub renamed: Vec<(RelPath, RelPath)>,
}

/// What a directory made only to hold a placed entry looks like until its own upsert.
fn placeholder(path: RelPath) -> Entry {
    Entry {
        path,
        kind: EntryKind::Dir,
        mode: 0o700,
        mtime: Mtime { sec: 0, nsec: 0 },
    }
}

impl ChangeSet {
    pub fn is_empty(&self) -> bool {
        self.stash.is_empty() && self.removes.is_empty() && self.upserts.is_empty()
    }

    /// How many entries move.
    pub fn moves(&self) -> usize {
        self.place.len()
    }

    /// Applies the changes to `index` in the order the receiver applies them. Inodes of
    /// upserted entries come from `inodes`.
    pub fn apply(&self, index: &mut Index, inodes: &dyn Fn(&RelPath) -> Ino) {
        for (from, to) in &self.stash {
            index.rename(from, to);
        }
        for (from, to) in &self.place {
            index.place(from, to);
        }
        for e in &self.upserts {
            index.upsert(e.clone(), inodes(&e.path));
        }
        for p in &self.removes {
            index.remove_subtree(p);
        }
    }
}

fn under(path: &[u8], dir: &[u8]) -> bool {
    path.len() > dir.len() && path.starts_with(dir) && path.get(dir.len()) == Some(&b'/')
}

/// `path` with its prefix `from` replaced by `to` (`path` is `from` or under it).
fn moved(path: &RelPath, from: &RelPath, to: &RelPath) -> RelPath {
    let rest = path
        .as_bytes()
        .get(from.as_bytes().len()..)
        .unwrap_or_default();
    let mut p = to.as_bytes().to_vec();
    p.extend_from_slice(rest);
    RelPath::unchecked(p)
}

/// The ancestors of `p`, outermost first.
pub fn ancestors(p: &RelPath) -> impl Iterator<Item = RelPath> + '_ {
    let b = p.as_bytes();
    b.iter()
        .enumerate()
        .filter(|&(_, &c)| c == b'/')
        .map(move |(i, _)| RelPath::unchecked(b.get(..i).unwrap_or_default().to_vec()))
}

impl Index {
    pub fn new() -> Index {
        Index::default()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get(&self, p: &RelPath) -> Option<&Indexed> {
        self.map.get(p)
    }

    pub fn contains(&self, p: &RelPath) -> bool {
        self.map.contains_key(p)
    }

    pub fn insert(&mut self, entry: Entry, ino: Ino) {
        self.map.insert(entry.path.clone(), Indexed { entry, ino });
    }

    /// Creates or updates one entry; one of another kind is replaced with what was under it.
    pub fn upsert(&mut self, entry: Entry, ino: Ino) {
        if let Some(old) = self.map.get(&entry.path)
            && !same_kind(&old.entry, &entry)
        {
            self.remove_subtree(&entry.path.clone());
        }
        self.insert(entry, ino);
    }

    pub fn iter(&self) -> impl Iterator<Item = &Indexed> {
        self.map.values()
    }

    /// Removes `p` and everything under it.
    pub fn remove_subtree(&mut self, p: &RelPath) {
        let doomed: Vec<RelPath> = self.subtree(p).map(|i| i.entry.path.clone()).collect();
        for d in doomed {
            self.map.remove(&d);
        }
    }

    /// `p` and everything under it, in path order.
    pub fn subtree<'a>(&'a self, p: &'a RelPath) -> impl Iterator<Item = &'a Indexed> + 'a {
        // Paths under `p` sort after `p/` and before `p0` ('0' follows '/'), with no unrelated
        // path between them; `p` itself comes first.
        let mut end = p.as_bytes().to_vec();
        end.push(b'0');
        let end = RelPath::unchecked(end);
        let me = self.map.get(p).into_iter();
        let mut start = p.as_bytes().to_vec();
        start.push(b'/');
        me.chain(
            self.map
                .range(RelPath::unchecked(start)..end)
                .map(|(_, v)| v),
        )
    }

    /// The entries directly in directory `dir` (`None`: the root).
    pub fn children<'a>(
        &'a self,
        dir: Option<&'a RelPath>,
    ) -> Box<dyn Iterator<Item = &'a Indexed> + 'a> {
        match dir {
            None => Box::new(self.map.values().filter(|i| i.entry.path.depth() == 0)),
            Some(d) => {
                let depth = d.depth() + 1;
                Box::new(
                    self.subtree(d)
                        .filter(move |i| i.entry.path.depth() == depth),
                )
            }
        }
    }

    /// Moves `from` and everything under it to `to` (replacing what was at `to`).
    pub fn rename(&mut self, from: &RelPath, to: &RelPath) {
        let moving: Vec<Indexed> = self.subtree(from).cloned().collect();
        if moving.is_empty() {
            return;
        }
        self.remove_subtree(&from.clone());
        self.remove_subtree(&to.clone());
        for mut i in moving {
            let p = moved(&i.entry.path, from, to);
            i.entry.path = p.clone();
            self.map.insert(p, i);
        }
    }

    /// [`Index::rename`] as a placement does it: missing parents of `to` are made and a
    /// non-directory in their way is replaced.
    pub fn place(&mut self, from: &RelPath, to: &RelPath) {
        if self.subtree(from).next().is_none() {
            return;
        }
        for a in ancestors(to) {
            match self.map.get(&a) {
                Some(i) if i.entry.is_dir() => {}
                _ => {
                    self.remove_subtree(&a);
                    self.insert(placeholder(a), (0, 0));
                }
            }
        }
        self.rename(from, to);
    }

    /// Only the part of `self` in `scope`: paths with (`true`) or without everything under
    /// them, and the directories they are in (so a view knows which parents exist).
    pub fn restricted<'a>(&self, scope: impl IntoIterator<Item = (&'a RelPath, bool)>) -> Index {
        let mut out = Index::new();
        for (s, deep) in scope {
            for a in ancestors(s) {
                if let Some(i) = self.map.get(&a) {
                    out.map.insert(a, i.clone());
                }
            }
            if deep {
                for i in self.subtree(s) {
                    out.map.insert(i.entry.path.clone(), i.clone());
                }
            } else if let Some(i) = self.map.get(s) {
                out.map.insert(s.clone(), i.clone());
            }
        }
        out
    }

    /// Replaces what `self` has at each scope path (as in [`Index::restricted`]) with what
    /// `from` has there.
    pub fn update_from<'a>(
        &mut self,
        from: &Index,
        scope: impl IntoIterator<Item = (&'a RelPath, bool)>,
    ) {
        for (s, deep) in scope {
            if deep {
                self.remove_subtree(s);
                for i in from.subtree(s) {
                    self.map.insert(i.entry.path.clone(), i.clone());
                }
            } else {
                match from.map.get(s) {
                    Some(i) => {
                        self.map.insert(s.clone(), i.clone());
                    }
                    None => {
                        self.map.remove(s);
                    }
                }
            }
        }
    }
}

fn same_kind(a: &Entry, b: &Entry) -> bool {
    matches!(
        (&a.kind, &b.kind),
        (EntryKind::File { .. }, EntryKind::File { .. })
            | (EntryKind::Dir, EntryKind::Dir)
            | (EntryKind::Symlink { .. }, EntryKind::Symlink { .. })
    )
}

/// The changes that turn `old` into `new` (both views of the same scope). Entries at `touched`
/// paths are upserted even when they look the same (a file rewritten within its mtime's
/// granularity). Parking names are made from `nonce`, which must differ from batch to batch.
pub fn diff(old: &Index, new: &Index, nonce: u64, touched: &HashSet<RelPath>) -> ChangeSet {
    let known = |i: &Indexed| i.ino != (0, 0);
    let old_by_ino: HashMap<Ino, &Indexed> = old
        .map
        .values()
        .filter(|o| known(o))
        .map(|o| (o.ino, o))
        .collect();
    // Whether the old entry `o` left its path (its inode is no longer there as that kind).
    let left = |o: &Indexed| {
        new.map
            .get(&o.entry.path)
            .is_none_or(|n| n.ino != o.ino || !same_kind(&o.entry, &n.entry))
    };
    // A move's source for new entry `n`: the old entry on its inode, elsewhere, that left.
    // A file must also have kept its size and mtime (a rename changes neither): file systems
    // hand a freed inode number to the next new file at once, and that is no move.
    let source_of = |n: &Indexed| {
        old_by_ino
            .get(&n.ino)
            .filter(|o| {
                o.entry.path != n.entry.path && same_kind(&o.entry, &n.entry) && left(o) && {
                    match (&o.entry.kind, &n.entry.kind) {
                        (EntryKind::File { size: a, .. }, EntryKind::File { size: b, .. }) => {
                            a == b && o.entry.mtime == n.entry.mtime
                        }
                        (EntryKind::Symlink { target: a }, EntryKind::Symlink { target: b }) => {
                            a == b
                        }
                        _ => true,
                    }
                }
            })
            .copied()
    };
    // New entries that may have moved here: new paths, kind changes, other inodes. (An
    // update in place, or an editor's atomic save, keeps its path: no move.)
    let mut came: Vec<&Indexed> = Vec::new();
    for (p, n) in &new.map {
        match old.map.get(p) {
            Some(o) if same_kind(&o.entry, &n.entry) => {
                if known(n) && n.ino != o.ino && source_of(n).is_some() {
                    came.push(n); // moved onto this path
                }
            }
            _ => came.push(n),
        }
    }
    // Directories first, outer before inner, so what they hold moves with them.
    came.sort_by(|a, b| {
        (!a.entry.is_dir(), a.entry.path.depth(), &a.entry.path).cmp(&(
            !b.entry.is_dir(),
            b.entry.path.depth(),
            &b.entry.path,
        ))
    });
    // The moves: (old path, new path). Old paths accounted for by a move, and new paths that
    // arrived by one (directly, or inside a moved directory at the same place).
    let mut moves: Vec<(RelPath, RelPath)> = Vec::new();
    let mut consumed: HashSet<RelPath> = HashSet::new();
    let mut arrived: HashSet<RelPath> = HashSet::new();
    for c in &came {
        if arrived.contains(&c.entry.path) || !known(c) {
            continue;
        }
        let Some(src) = source_of(c) else { continue };
        if consumed.contains(&src.entry.path) {
            continue;
        }
        moves.push((src.entry.path.clone(), c.entry.path.clone()));
        let (src_path, dst_path) = (&src.entry.path, &c.entry.path);
        // What the source holds moves with it: pieces that are, in the new view, at the same
        // place under the destination on the same inode need no move of their own.
        for o in old.subtree(src_path) {
            let there = moved(&o.entry.path, src_path, dst_path);
            if new
                .map
                .get(&there)
                .is_some_and(|n| n.ino == o.ino && same_kind(&o.entry, &n.entry))
            {
                consumed.insert(o.entry.path.clone());
                arrived.insert(there);
            }
        }
    }
    // Parking: sources outer first; a source inside one already parked is named inside it.
    let mut order: Vec<usize> = (0..moves.len()).collect();
    order.sort_by(|&a, &b| {
        let (pa, pb) = (&moves[a].0, &moves[b].0);
        pa.depth().cmp(&pb.depth()).then_with(|| pa.cmp(pb))
    });
    let parking: Vec<RelPath> = (0..moves.len() as u64)
        .map(|k| RelPath::unchecked(super::tempname::move_name(nonce, k)))
        .collect();
    let mut stash: Vec<(RelPath, RelPath)> = Vec::new();
    for &k in &order {
        let from = translate(&stash, &moves[k].0);
        stash.push((from, parking[k].clone()));
    }
    // Placing: outer destinations first.
    let mut place: Vec<(RelPath, RelPath)> = (0..moves.len())
        .map(|k| (parking[k].clone(), moves[k].1.clone()))
        .collect();
    place.sort_by(|a, b| a.1.depth().cmp(&b.1.depth()).then_with(|| a.1.cmp(&b.1)));
    // The old tree once everything has moved: what of it differs from the new one is
    // upserted, and what the new one lacks is removed.
    let mut fin = old.clone();
    for (f, t) in &stash {
        fin.rename(f, t);
    }
    for (f, t) in &place {
        fin.place(f, t);
    }
    let mut upserts: Vec<Entry> = new
        .map
        .values()
        .filter(|n| {
            touched.contains(&n.entry.path)
                || fin
                    .map
                    .get(&n.entry.path)
                    .is_none_or(|f| f.entry != n.entry)
        })
        .map(|n| n.entry.clone())
        .collect();
    upserts.sort_by(|a, b| {
        a.path
            .depth()
            .cmp(&b.path.depth())
            .then_with(|| a.path.cmp(&b.path))
    });
    let gone: HashSet<&RelPath> = fin
        .map
        .keys()
        .filter(|k| !new.map.contains_key(*k))
        .collect();
    let mut removes: Vec<RelPath> = gone
        .iter()
        .filter(|p| !ancestors(p).any(|a| gone.contains(&a)))
        .map(|p| (*p).clone())
        .collect();
    removes.sort();
    ChangeSet {
        stash,
        place,
        upserts,
        removes,
        renamed: moves,
    }
}

/// Where `p` (an old path) is once `renames` are applied in order.
fn translate(renames: &[(RelPath, RelPath)], p: &RelPath) -> RelPath {
    let mut p = p.clone();
    for (f, t) in renames {
        if p == *f || under(p.as_bytes(), f.as_bytes()) {
            p = moved(&p, f, t);
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Mtime;
    use rand::{Rng, SeedableRng};

    /// A toy filesystem: path → (kind, inode, version), mutated the ways tools do.
    #[derive(Clone, Debug, Default)]
    struct Fs {
        map: BTreeMap<String, (u8, u64, u32)>,
        next_ino: u64,
        /// Inode numbers freed by removals: handed out again, as file systems do.
        freed: Vec<u64>,
    }

    const FILE: u8 = 0;
    const DIR: u8 = 1;
    const LINK: u8 = 2;

    impl Fs {
        fn parent(p: &str) -> Option<&str> {
            p.rfind('/').map(|i| &p[..i])
        }

        fn ok_parent(&self, p: &str) -> bool {
            Self::parent(p).is_none_or(|d| self.map.get(d).is_some_and(|e| e.0 == DIR))
        }

        fn add(&mut self, p: &str, kind: u8) {
            if self.ok_parent(p) && !self.map.contains_key(p) {
                let ino = self.freed.pop().unwrap_or_else(|| {
                    self.next_ino += 1;
                    self.next_ino
                });
                self.map.insert(p.to_string(), (kind, ino, 0));
            }
        }

        fn subtree(&self, p: &str) -> Vec<String> {
            self.map
                .keys()
                .filter(|k| *k == p || k.starts_with(&format!("{p}/")))
                .cloned()
                .collect()
        }

        fn remove(&mut self, p: &str) {
            for k in self.subtree(p) {
                if let Some(v) = self.map.remove(&k) {
                    self.freed.push(v.1);
                }
            }
        }

        /// `mv from to`, as rename(2): onto nothing, a file onto a file, a dir onto an empty
        /// dir.
        fn mv(&mut self, from: &str, to: &str) {
            let Some(&(kind, _, _)) = self.map.get(from) else {
                return;
            };
            if to == from || to.starts_with(&format!("{from}/")) || !self.ok_parent(to) {
                return;
            }
            match self.map.get(to) {
                None => {}
                Some(&(k, ..)) if k != DIR && kind != DIR => {}
                Some(&(DIR, ..)) if kind == DIR && self.subtree(to).len() == 1 => {}
                Some(_) => return,
            }
            self.remove(to);
            for k in self.subtree(from) {
                let v = self.map.remove(&k).unwrap();
                self.map.insert(format!("{to}{}", &k[from.len()..]), v);
            }
        }

        fn index(&self) -> Index {
            let mut ix = Index::new();
            for (p, &(kind, ino, ver)) in &self.map {
                let kind = match kind {
                    FILE => EntryKind::File {
                        size: u64::from(ver),
                        digest: None,
                    },
                    DIR => EntryKind::Dir,
                    _ => EntryKind::Symlink {
                        target: format!("t{ver}").into_bytes(),
                    },
                };
                ix.insert(
                    Entry {
                        path: RelPath::new(p.as_str()).unwrap(),
                        kind,
                        mode: 0o644,
                        mtime: Mtime {
                            sec: i64::from(ver),
                            nsec: 0,
                        },
                    },
                    (1, ino),
                );
            }
            ix
        }
    }

    fn names(rng: &mut impl Rng, fs: &Fs) -> String {
        let dirs: Vec<&String> = fs
            .map
            .iter()
            .filter(|(_, v)| v.0 == DIR)
            .map(|(k, _)| k)
            .collect();
        let leaf = format!("n{}", rng.random_range(0..6));
        if dirs.is_empty() || rng.random_bool(0.3) {
            leaf
        } else {
            format!("{}/{leaf}", dirs[rng.random_range(0..dirs.len())])
        }
    }

    fn random_fs(rng: &mut impl Rng) -> Fs {
        let mut fs = Fs::default();
        for _ in 0..rng.random_range(5..40) {
            let p = names(rng, &fs);
            let kind = [FILE, FILE, DIR, LINK][rng.random_range(0..4)];
            fs.add(&p, kind);
        }
        fs
    }

    fn edit(rng: &mut impl Rng, fs: &mut Fs) {
        let keys: Vec<String> = fs.map.keys().cloned().collect();
        let pick = |rng: &mut dyn rand::RngCore| -> Option<String> {
            (!keys.is_empty()).then(|| keys[rng.random_range(0..keys.len())].clone())
        };
        match rng.random_range(0..9) {
            0 => {
                let p = names(rng, fs);
                fs.add(&p, [FILE, DIR, LINK][rng.random_range(0..3)]);
            }
            1 => {
                if let Some(p) = pick(rng) {
                    fs.remove(&p);
                }
            }
            2 | 3 => {
                if let Some(p) = pick(rng) {
                    let to = names(rng, fs);
                    fs.mv(&p, &to);
                }
            }
            4 => {
                // Content change in place.
                if let Some(p) = pick(rng)
                    && let Some(v) = fs.map.get_mut(&p)
                    && v.0 != DIR
                {
                    v.2 += 1;
                }
            }
            5 => {
                // Atomic save: a new inode under the same name.
                if let Some(p) = pick(rng)
                    && fs.map.get(&p).is_some_and(|v| v.0 == FILE)
                {
                    fs.next_ino += 1;
                    let ino = fs.next_ino;
                    let v = fs.map.get_mut(&p).unwrap();
                    v.1 = ino;
                    v.2 += 1;
                }
            }
            6 => {
                // Kind change: delete and recreate as something else.
                if let Some(p) = pick(rng) {
                    let kind = fs.map[&p].0;
                    fs.remove(&p);
                    fs.add(&p, if kind == DIR { FILE } else { DIR });
                }
            }
            7 => {
                // Swap two files through a temporary name.
                if let (Some(a), Some(b)) = (pick(rng), pick(rng)) {
                    fs.mv(&a, "swap-tmp");
                    fs.mv(&b, &a);
                    fs.mv("swap-tmp", &b);
                }
            }
            _ => {
                // Rename a directory and change something inside it.
                if let Some(p) = pick(rng)
                    && fs.map[&p].0 == DIR
                {
                    let to = names(rng, fs);
                    fs.mv(&p, &to);
                    let inside: Vec<String> = fs.subtree(&to);
                    if let Some(x) = inside.last()
                        && let Some(v) = fs.map.get_mut(x)
                        && v.0 != DIR
                    {
                        v.2 += 1;
                    }
                }
            }
        }
    }

    /// Entries only (what the receiver sees): inodes do not travel.
    fn entries(ix: &Index) -> BTreeMap<RelPath, Entry> {
        ix.iter()
            .map(|i| (i.entry.path.clone(), i.entry.clone()))
            .collect()
    }

    /// The paths a watcher would report changed between two views: `true` for those whose
    /// subtree may differ too.
    fn changed_scope(old: &Index, new: &Index) -> Vec<(RelPath, bool)> {
        let mut out = Vec::new();
        let paths: std::collections::BTreeSet<&RelPath> =
            old.map.keys().chain(new.map.keys()).collect();
        for p in paths {
            match (old.get(p), new.get(p)) {
                (Some(o), Some(n)) if o.ino == n.ino && same_kind(&o.entry, &n.entry) => {
                    if o.entry != n.entry {
                        out.push((p.clone(), false));
                    }
                }
                _ => out.push((p.clone(), true)),
            }
        }
        out
    }

    #[test]
    fn touched_entries_are_sent_even_when_they_look_the_same() {
        let mut fs = Fs::default();
        fs.add("a", FILE);
        fs.add("b", FILE);
        let ix = fs.index();
        let touched: HashSet<RelPath> = [RelPath::new("b").unwrap()].into();
        let cs = diff(&ix, &ix, 1, &touched);
        assert_eq!(cs.upserts.len(), 1);
        assert_eq!(cs.upserts[0].path.as_bytes(), b"b");
        assert!(cs.stash.is_empty() && cs.removes.is_empty());
    }

    #[test]
    fn swaps_and_cycles_go_through_parking_names() {
        let mut fs = Fs::default();
        for p in ["a", "b", "c"] {
            fs.add(p, FILE);
        }
        let old = fs.index();
        // a -> b -> c -> a
        fs.mv("a", "t");
        fs.mv("c", "a");
        fs.mv("b", "c");
        fs.mv("t", "b");
        let new = fs.index();
        let cs = diff(&old, &new, 9, &HashSet::new());
        assert_eq!(cs.moves(), 3, "{cs:?}");
        assert!(cs.upserts.is_empty() && cs.removes.is_empty(), "{cs:?}");
        for (_, park) in &cs.stash {
            assert_eq!(
                crate::engine::tempname::ours(park.as_bytes()),
                Some(crate::engine::tempname::Ours::Move)
            );
        }
        let mut applied = old.clone();
        cs.apply(&mut applied, &|_| (0, 0));
        assert_eq!(entries(&applied), entries(&new));
    }

    #[test]
    fn seeded_random_edits_diff_and_apply_to_the_same_tree() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1234);
        let mut renames = 0;
        for case in 0..3000 {
            let mut fs = random_fs(&mut rng);
            let old = fs.index();
            for _ in 0..rng.random_range(1..8) {
                edit(&mut rng, &mut fs);
            }
            let new = fs.index();
            let cs = diff(&old, &new, case, &HashSet::new());
            renames += cs.moves();
            let mut applied = old.clone();
            cs.apply(&mut applied, &|_| (0, 0));
            assert_eq!(
                entries(&applied),
                entries(&new),
                "case {case}: {cs:#?}\nold: {:#?}\nnew: {:#?}",
                entries(&old).keys().collect::<Vec<_>>(),
                entries(&new).keys().collect::<Vec<_>>()
            );
            // No changes, no work.
            assert!(diff(&new, &new, 0, &HashSet::new()).is_empty());
            // What a watch does: diff only what changed (each path that appeared, vanished or
            // changed kind or inode with everything under it; others alone) and apply that to
            // the whole tree.
            let scope = changed_scope(&old, &new);
            let view = |ix: &Index| ix.restricted(scope.iter().map(|(p, d)| (p, *d)));
            let cs = diff(&view(&old), &view(&new), case, &HashSet::new());
            let mut applied = old.clone();
            cs.apply(&mut applied, &|_| (0, 0));
            assert_eq!(
                entries(&applied),
                entries(&new),
                "case {case}, scoped: {cs:#?}"
            );
            let mut synced = old.clone();
            synced.update_from(&new, scope.iter().map(|(p, d)| (p, *d)));
            assert_eq!(synced, new, "case {case}: the synced view catches up");
        }
        assert!(renames > 500, "the edits rename things: {renames}");
    }

    #[test]
    fn a_renamed_directory_is_one_rename_not_its_contents() {
        let mut fs = Fs::default();
        fs.add("big", DIR);
        for i in 0..100 {
            fs.add(&format!("big/f{i}"), FILE);
        }
        fs.add("big/sub", DIR);
        fs.add("big/sub/x", FILE);
        let old = fs.index();
        fs.mv("big", "moved");
        fs.map.get_mut("moved/f7").unwrap().2 += 1; // and one file edited after
        let cs = diff(&old, &fs.index(), 7, &HashSet::new());
        assert_eq!(cs.moves(), 1, "{cs:?}");
        assert_eq!(cs.stash[0].0.as_bytes(), b"big");
        assert_eq!(cs.place[0].1.as_bytes(), b"moved");
        assert!(cs.removes.is_empty(), "{cs:?}");
        assert_eq!(cs.upserts.len(), 1, "only the edited file: {cs:?}");
        assert_eq!(cs.upserts[0].path.as_bytes(), b"moved/f7");
        // An editor's atomic save is an update, not a removal (the old copy stays the base).
        let mut fs2 = Fs::default();
        fs2.add("doc", FILE);
        let old = fs2.index();
        fs2.next_ino += 1;
        let v = fs2.map.get_mut("doc").unwrap();
        (v.1, v.2) = (fs2.next_ino, 1);
        let cs = diff(&old, &fs2.index(), 8, &HashSet::new());
        assert!(cs.removes.is_empty() && cs.moves() == 0, "{cs:?}");
        assert_eq!(cs.upserts.len(), 1);
    }
}
