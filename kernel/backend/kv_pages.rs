//! Which pages of a paged KV cache each sequence owns. A pool hands out
//! pages of `page_size` positions; a sequence's table lists its pages in
//! position order. Forking a sequence (a candidate from a shared prompt)
//! shares every page instead of copying it, with a count of holders per
//! page; a shared page is copied only when a holder writes into it (the
//! partly filled last page of a fork), and a page returns to the pool when
//! its last holder lets it go. The bookkeeping is host-side and device
//! neutral; the CUDA backend keeps the pages' keys and values.

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

#[derive(Debug)]
struct PoolState {
    free: Vec<u32>,
    holders: Vec<u32>,
}

/// The pages of one layer's cache (every layer's pool has the same shape).
#[derive(Debug)]
pub struct PagePool {
    page_size: usize,
    pages: usize,
    state: Mutex<PoolState>,
}

impl PagePool {
    pub fn new(pages: usize, page_size: usize) -> Arc<PagePool> {
        // Lowest page first: pop from the end of a reversed list.
        let free = (0..pages as u32).rev().collect();
        Arc::new(PagePool { page_size, pages, state: Mutex::new(PoolState { free, holders: vec![0; pages] }) })
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    pub fn free_pages(&self) -> usize {
        self.lock().free.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn release(&self, pages: &[u32]) {
        let mut state = self.lock();
        for &page in pages {
            let holders = &mut state.holders[page as usize];
            *holders -= 1;
            if *holders == 0 {
                state.free.push(page);
            }
        }
    }
}

/// What a device must do before writing new positions: copy these pages
/// (from, to) whole, then write position i's row at `slots[i]`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reserved {
    pub copies: Vec<(u32, u32)>,
    pub slots: Vec<u32>,
}

/// One sequence's pages in one layer.
#[derive(Debug)]
pub struct PageTable {
    pool: Arc<PagePool>,
    pages: Vec<u32>,
    len: usize,
}

impl PageTable {
    pub fn new(pool: Arc<PagePool>) -> PageTable {
        PageTable { pool, pages: Vec::new(), len: 0 }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pages, in position order: position p is at page `pages[p / page_size]`.
    pub fn pages(&self) -> &[u32] {
        &self.pages
    }

    /// Where position `p` lives in the pool (page · page_size + offset).
    pub fn slot(&self, position: usize) -> u32 {
        let size = self.pool.page_size;
        self.pages[position / size] * size as u32 + (position % size) as u32
    }

    /// Makes room for `count` more positions: the partly filled last page
    /// copied first if another sequence shares it, new pages from the pool.
    /// Refuses with RESOURCE_EXHAUSTED, changing nothing, when the pool
    /// has too few free pages.
    pub fn extend(&mut self, count: usize) -> Result<Reserved> {
        let size = self.pool.page_size;
        let (old, new) = (self.len, self.len + count);
        let needed = new.div_ceil(size) - self.pages.len();
        let mut state = self.pool.lock();
        let shared_tail = !old.is_multiple_of(size) && count > 0 && state.holders[self.pages[old / size] as usize] > 1;
        let taking = needed + usize::from(shared_tail);
        if state.free.len() < taking {
            return Err(Error::ResourceExhausted(format!(
                "the KV cache is full: {} more pages of {size} positions needed, {} of {} free; \
                 fewer or shorter sequences at once would fit",
                taking,
                state.free.len(),
                self.pool.pages
            )));
        }
        let mut take = || {
            let page = state.free.pop().expect("counted above");
            state.holders[page as usize] = 1;
            page
        };
        let mut copies = Vec::new();
        let mut replaced = None;
        if shared_tail {
            let last = old / size;
            let fresh = take();
            copies.push((self.pages[last], fresh));
            replaced = Some(std::mem::replace(&mut self.pages[last], fresh));
        }
        for _ in 0..needed {
            let page = take();
            self.pages.push(page);
        }
        if let Some(page) = replaced {
            // Still held by the sequence it is shared with.
            state.holders[page as usize] -= 1;
        }
        drop(state);
        self.len = new;
        Ok(Reserved { copies, slots: (old..new).map(|p| self.slot(p)).collect() })
    }

    /// Keeps the first `len` positions; pages past them go back.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        let keep = len.div_ceil(self.pool.page_size);
        let dropped = self.pages.split_off(keep);
        self.pool.release(&dropped);
        self.len = len;
    }
}

/// A fork: the same positions, sharing every page.
impl Clone for PageTable {
    fn clone(&self) -> PageTable {
        let mut state = self.pool.lock();
        for &page in &self.pages {
            state.holders[page as usize] += 1;
        }
        PageTable { pool: self.pool.clone(), pages: self.pages.clone(), len: self.len }
    }
}

impl Drop for PageTable {
    fn drop(&mut self) {
        self.pool.release(&self.pages);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequence_takes_pages_as_it_grows_and_gives_them_back() {
        let pool = PagePool::new(8, 4);
        let mut table = PageTable::new(pool.clone());
        let reserved = table.extend(6).unwrap();
        assert_eq!(reserved, Reserved { copies: vec![], slots: vec![0, 1, 2, 3, 4, 5] });
        assert_eq!((table.pages(), pool.free_pages()), (&[0, 1][..], 6));
        // The partly filled page is the sequence's own: written in place.
        assert_eq!(table.extend(3).unwrap().slots, vec![6, 7, 8]);
        assert_eq!(table.pages(), &[0, 1, 2]);
        table.truncate(4);
        assert_eq!((table.len(), table.pages(), pool.free_pages()), (4, &[0][..], 7));
        drop(table);
        assert_eq!(pool.free_pages(), 8);
    }

    #[test]
    fn forks_share_pages_and_copy_only_the_shared_partial_page_they_write() {
        let pool = PagePool::new(8, 4);
        let mut prompt = PageTable::new(pool.clone());
        prompt.extend(6).unwrap();
        let (mut a, mut b) = (prompt.clone(), prompt.clone());
        assert_eq!(pool.free_pages(), 6, "forks copy nothing");
        // Candidate a writes position 6, inside shared page 1: copied first.
        let first = a.extend(1).unwrap();
        assert_eq!(first.copies, vec![(1, 2)]);
        assert_eq!((first.slots, a.pages()), (vec![2 * 4 + 2], &[0, 2][..]));
        // b too; then the prompt itself, the last holder of page 1, writes in place.
        assert_eq!(b.extend(1).unwrap().copies, vec![(1, 3)]);
        assert_eq!(prompt.extend(1).unwrap(), Reserved { copies: vec![], slots: vec![6] });
        // Page 0 (full) stays shared by all three; each has its own second page.
        assert_eq!(pool.free_pages(), 4);
        drop(prompt);
        assert_eq!(pool.free_pages(), 5, "the prompt's own second page");
        drop(a);
        assert_eq!(pool.free_pages(), 6, "page 0 is still b's");
        drop(b);
        assert_eq!(pool.free_pages(), 8);
    }

    #[test]
    fn a_full_pool_refuses_without_changing_the_sequence() {
        let pool = PagePool::new(2, 4);
        let mut table = PageTable::new(pool.clone());
        table.extend(5).unwrap();
        let fork = table.clone();
        // 5 → 9 positions needs a third page, and the shared tail a copy: 2 pages, none free.
        let err = table.extend(4).unwrap_err();
        assert!(matches!(&err, Error::ResourceExhausted(m) if m.contains("KV cache is full")), "{err:?}");
        assert_eq!((table.len(), table.pages()), (5, &[0, 1][..]));
        drop(fork);
        drop(table);
        assert_eq!(pool.free_pages(), 2);
    }
}
