//! An intrusive doubly-linked list over slot indices, in order of last use (head = least
//! recently used). Every operation is O(1).

/// "No slot": the end of the list, or an unlinked slot.
pub(crate) const NIL: u32 = u32::MAX;

#[derive(Debug)]
pub(crate) struct SlotList {
    prev: Vec<u32>,
    next: Vec<u32>,
    /// `linked[s]`: whether slot `s` is in the list (guards double insert / unlink).
    linked: Vec<bool>,
    head: u32,
    tail: u32,
    len: usize,
}

impl SlotList {
    pub(crate) fn new(slots: usize) -> SlotList {
        SlotList {
            prev: vec![NIL; slots],
            next: vec![NIL; slots],
            linked: vec![false; slots],
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Least recently used slot, or [`NIL`].
    pub(crate) fn head(&self) -> u32 {
        self.head
    }

    /// Slot after `s` (towards most recently used), or [`NIL`].
    pub(crate) fn next(&self, s: u32) -> u32 {
        self.next[s as usize]
    }

    #[cfg(test)]
    pub(crate) fn contains(&self, s: u32) -> bool {
        self.linked[s as usize]
    }

    /// Appends an unlinked slot as the most recently used.
    pub(crate) fn push_back(&mut self, s: u32) {
        debug_assert!(!self.linked[s as usize], "slot {s} already in the LRU list");
        let i = s as usize;
        self.prev[i] = self.tail;
        self.next[i] = NIL;
        if self.tail == NIL {
            self.head = s;
        } else {
            self.next[self.tail as usize] = s;
        }
        self.tail = s;
        self.linked[i] = true;
        self.len += 1;
    }

    /// Removes a linked slot.
    pub(crate) fn unlink(&mut self, s: u32) {
        debug_assert!(self.linked[s as usize], "slot {s} not in the LRU list");
        let i = s as usize;
        let (p, n) = (self.prev[i], self.next[i]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[i] = NIL;
        self.next[i] = NIL;
        self.linked[i] = false;
        self.len -= 1;
    }

    /// Makes a linked slot the most recently used.
    pub(crate) fn move_to_back(&mut self, s: u32) {
        if self.tail != s {
            self.unlink(s);
            self.push_back(s);
        }
    }

    /// Slots from least to most recently used (O(len); for the tests).
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            if cur == NIL {
                None
            } else {
                let s = cur;
                cur = self.next[s as usize];
                Some(s)
            }
        })
    }
}
