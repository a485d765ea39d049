//! Region bitmaps: the in-memory `Bitmap` (one bit per region of the
//! source) and `BitmapFile`, its on-disk form in the state directory.
//!
//! An association persists one bitmap file holding the union of everything
//! that may make the replica differ from the primary after a crash:
//! out-of-sync regions, regions a copy job has not reached yet, and the
//! "activity log" (regions with writes possibly in flight). The file is
//! updated in place, page by page, followed by `fdatasync`. That is safe
//! without a rename because every update only needs its *newly set* bits to
//! be durable before the write they protect is issued (we wait for
//! `fdatasync`), while a torn page can only leave bits set that were being
//! cleared — which costs a needless resync of a region, never a missed one.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// One bit per region, with a cached population count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
    ones: u64,
}

impl Bitmap {
    /// An all-clear bitmap of `len` bits.
    pub fn new(len: u64) -> Self {
        Bitmap {
            words: vec![0; len.div_ceil(64) as usize],
            len,
            ones: 0,
        }
    }

    /// An all-set bitmap of `len` bits.
    pub fn full(len: u64) -> Self {
        let mut b = Bitmap::new(len);
        b.set_all();
        b
    }

    /// Build from raw words; bits at or beyond `len` are ignored.
    pub fn from_words(mut words: Vec<u64>, len: u64) -> Self {
        words.resize(len.div_ceil(64) as usize, 0);
        let mut b = Bitmap {
            words,
            len,
            ones: 0,
        };
        b.mask_tail();
        b.ones = b.words.iter().map(|w| u64::from(w.count_ones())).sum();
        b
    }

    fn mask_tail(&mut self) {
        let rem = self.len % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.ones == 0
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.ones
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    pub fn get(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Set bit `i`; returns true when it was clear before.
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        match self.words.get_mut((i / 64) as usize) {
            Some(w) if *w & (1 << (i % 64)) == 0 => {
                *w |= 1 << (i % 64);
                self.ones += 1;
                true
            }
            _ => false,
        }
    }

    /// Clear bit `i`; returns true when it was set before.
    pub fn clear(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        match self.words.get_mut((i / 64) as usize) {
            Some(w) if *w & (1 << (i % 64)) != 0 => {
                *w &= !(1 << (i % 64));
                self.ones -= 1;
                true
            }
            _ => false,
        }
    }

    /// Set bits `first..=last` (clipped to the bitmap).
    pub fn set_range(&mut self, first: u64, last: u64) {
        for i in first..=last.min(self.len.saturating_sub(1)) {
            self.set(i);
        }
    }

    /// Whether any bit in `first..=last` is set.
    pub fn any_in(&self, first: u64, last: u64) -> bool {
        match self.next_set(first) {
            Some(i) => i <= last,
            None => false,
        }
    }

    pub fn set_all(&mut self) {
        for w in &mut self.words {
            *w = u64::MAX;
        }
        self.mask_tail();
        self.ones = self.len;
    }

    pub fn clear_all(&mut self) {
        for w in &mut self.words {
            *w = 0;
        }
        self.ones = 0;
    }

    /// `self |= other` (bitmaps of different lengths combine over the
    /// shorter one).
    pub fn union_with(&mut self, other: &Bitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
        self.mask_tail();
        self.ones = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
    }

    /// `self &= !other`.
    pub fn subtract(&mut self, other: &Bitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !*b;
        }
        self.ones = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.len || self.ones == 0 {
            return None;
        }
        let mut wi = (from / 64) as usize;
        let mut word = self.words.get(wi)? & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                let i = wi as u64 * 64 + u64::from(word.trailing_zeros());
                return (i < self.len).then_some(i);
            }
            wi += 1;
            word = *self.words.get(wi)?;
        }
    }

    /// Iterate over set bits in ascending order.
    pub fn iter_ones(&self) -> impl Iterator<Item = u64> + '_ {
        let mut next = self.next_set(0);
        std::iter::from_fn(move || {
            let cur = next?;
            next = self.next_set(cur + 1);
            Some(cur)
        })
    }
}

const MAGIC: &[u8; 8] = b"LMBITMAP";
const VERSION: u32 = 1;
/// The header occupies the first page; bitmap words start at this offset.
const HEADER_LEN: u64 = 4096;
/// Unit of in-place update.
const PAGE: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE / 8;

/// Parameters recorded in a bitmap file's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapGeometry {
    pub region_size: u64,
    pub regions: u64,
}

impl BitmapGeometry {
    /// Geometry for a device of `size` bytes cut into `region_size` regions.
    pub fn for_size(size: u64, region_size: u64) -> Self {
        BitmapGeometry {
            region_size,
            regions: size.div_ceil(region_size),
        }
    }
}

/// The on-disk bitmap of one association.
#[derive(Debug)]
pub struct BitmapFile {
    file: File,
    geometry: BitmapGeometry,
    /// What the file holds now (after the last successful persist).
    disk: Vec<u64>,
}

fn encode_header(g: BitmapGeometry) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN as usize];
    let mut v = Vec::with_capacity(32);
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&VERSION.to_le_bytes());
    v.extend_from_slice(&g.region_size.to_le_bytes());
    v.extend_from_slice(&g.regions.to_le_bytes());
    let crc = crc32c::crc32c(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    h[..v.len()].copy_from_slice(&v);
    h
}

fn decode_header(h: &[u8]) -> Option<BitmapGeometry> {
    let body = h.get(..28)?;
    let crc = u32::from_le_bytes(h.get(28..32)?.try_into().ok()?);
    if body.get(..8)? != MAGIC || crc32c::crc32c(body) != crc {
        return None;
    }
    let version = u32::from_le_bytes(body.get(8..12)?.try_into().ok()?);
    let region_size = u64::from_le_bytes(body.get(12..20)?.try_into().ok()?);
    let regions = u64::from_le_bytes(body.get(20..28)?.try_into().ok()?);
    (version == VERSION && region_size.is_power_of_two()).then_some(BitmapGeometry {
        region_size,
        regions,
    })
}

impl BitmapFile {
    /// Create (or replace) a bitmap file whose initial contents are
    /// `initial`, durable (file and directory entry) on return.
    pub fn create(path: &Path, geometry: BitmapGeometry, initial: &Bitmap) -> io::Result<Self> {
        let tmp = path.with_extension("tmp");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all_at(&encode_header(geometry), 0)?;
        let words = initial.words().to_vec();
        let mut bytes = Vec::with_capacity(words.len() * 8);
        for w in &words {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        let padded = bytes.len().div_ceil(PAGE) * PAGE;
        bytes.resize(padded.max(PAGE), 0);
        file.write_all_at(&bytes, HEADER_LEN)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            crate::registry::fsync_dir(dir)?;
        }
        Ok(BitmapFile {
            file,
            geometry,
            disk: words,
        })
    }

    /// Open an existing bitmap file. A file whose header is damaged or
    /// whose geometry differs from `expected` is reported as all-set
    /// (conservative: a full resync), and rewritten.
    pub fn open(path: &Path, expected: BitmapGeometry) -> io::Result<(Self, Bitmap)> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let mut header = vec![0u8; HEADER_LEN as usize];
        let header_ok =
            file.read_exact_at(&mut header, 0).is_ok() && decode_header(&header) == Some(expected);
        if !header_ok {
            tracing::warn!(path = %path.display(), "bitmap file damaged; assuming every region out of sync");
            let all = Bitmap::full(expected.regions);
            let bf = BitmapFile::create(path, expected, &all)?;
            return Ok((bf, all));
        }
        let nwords = expected.regions.div_ceil(64) as usize;
        let mut bytes = vec![0u8; nwords * 8];
        // A short file (torn extension) reads as set bits: conservative.
        let mut words = Vec::with_capacity(nwords);
        match file.read_exact_at(&mut bytes, HEADER_LEN) {
            Ok(()) => {
                for chunk in bytes.chunks_exact(8) {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(chunk);
                    words.push(u64::from_le_bytes(a));
                }
            }
            Err(_) => words.resize(nwords, u64::MAX),
        }
        let bitmap = Bitmap::from_words(words.clone(), expected.regions);
        Ok((
            BitmapFile {
                file,
                geometry: expected,
                disk: words,
            },
            bitmap,
        ))
    }

    pub fn geometry(&self) -> BitmapGeometry {
        self.geometry
    }

    /// Whether every bit set in `desired` within `first..=last` is already
    /// set on disk.
    pub fn covers(&self, desired: &Bitmap, first: u64, last: u64) -> bool {
        (first..=last.min(desired.len().saturating_sub(1))).all(|i| {
            !desired.get(i)
                || self
                    .disk
                    .get((i / 64) as usize)
                    .is_some_and(|w| w & (1 << (i % 64)) != 0)
        })
    }

    /// Write every page where `desired` differs from the disk image, then
    /// `fdatasync`. Returns the number of pages written.
    pub fn persist(&mut self, desired: &Bitmap) -> io::Result<usize> {
        let want = desired.words();
        let mut written = 0;
        for (page_idx, chunk) in want.chunks(WORDS_PER_PAGE).enumerate() {
            let start = page_idx * WORDS_PER_PAGE;
            let disk = self.disk.get(start..start + chunk.len());
            if disk == Some(chunk) {
                continue;
            }
            let mut bytes = Vec::with_capacity(chunk.len() * 8);
            for w in chunk {
                bytes.extend_from_slice(&w.to_le_bytes());
            }
            self.file
                .write_all_at(&bytes, HEADER_LEN + (start * 8) as u64)?;
            written += 1;
        }
        if written > 0 {
            self.file.sync_data()?;
            self.disk.clear();
            self.disk.extend_from_slice(want);
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_clear_count_and_next_set() {
        let mut b = Bitmap::new(130);
        assert!(b.is_empty());
        assert!(b.set(0));
        assert!(!b.set(0));
        assert!(b.set(64));
        assert!(b.set(129));
        assert!(!b.set(130), "out of range bits are ignored");
        assert_eq!(b.count(), 3);
        assert_eq!(b.next_set(1), Some(64));
        assert_eq!(b.next_set(65), Some(129));
        assert_eq!(b.next_set(130), None);
        assert!(b.clear(64));
        assert!(!b.clear(64));
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![0, 129]);
        assert!(b.any_in(100, 200));
        assert!(!b.any_in(1, 128));
        b.set_all();
        assert_eq!(b.count(), 130);
        assert_eq!(b.next_set(129), Some(129));
        b.clear_all();
        assert_eq!(b.next_set(0), None);
    }

    #[test]
    fn union_and_subtract() {
        let mut a = Bitmap::new(100);
        let mut b = Bitmap::new(100);
        a.set_range(0, 9);
        b.set_range(5, 14);
        a.union_with(&b);
        assert_eq!(a.count(), 15);
        a.subtract(&b);
        assert_eq!(
            a.iter_ones().collect::<Vec<_>>(),
            (0..5).collect::<Vec<_>>()
        );
    }

    #[test]
    fn file_round_trip_and_in_place_updates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bm");
        let g = BitmapGeometry::for_size(100 << 20, 1 << 16);
        let mut b = Bitmap::new(g.regions);
        b.set(3);
        let mut f = BitmapFile::create(&path, g, &b).unwrap();
        b.set(1500);
        b.clear(3);
        assert!(!f.covers(&b, 0, g.regions - 1));
        assert_eq!(f.persist(&b).unwrap(), 1);
        assert!(f.covers(&b, 0, g.regions - 1));
        assert_eq!(
            f.persist(&b).unwrap(),
            0,
            "nothing changed, nothing written"
        );
        drop(f);
        let (_, back) = BitmapFile::open(&path, g).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn damaged_or_mismatched_file_reads_as_all_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bm");
        let g = BitmapGeometry::for_size(1 << 20, 1 << 16);
        BitmapFile::create(&path, g, &Bitmap::new(g.regions)).unwrap();
        let other = BitmapGeometry::for_size(2 << 20, 1 << 16);
        let (_, b) = BitmapFile::open(&path, other).unwrap();
        assert_eq!(b.count(), other.regions);
        std::fs::write(&path, b"garbage").unwrap();
        let (_, b) = BitmapFile::open(&path, g).unwrap();
        assert_eq!(b.count(), g.regions);
    }

    proptest! {
        #[test]
        fn next_set_agrees_with_get(bits in proptest::collection::vec(0u64..300, 0..40), from in 0u64..310) {
            let mut b = Bitmap::new(300);
            for &i in &bits { b.set(i); }
            let expect = (from..300).find(|&i| b.get(i));
            prop_assert_eq!(b.next_set(from), expect);
            prop_assert_eq!(b.count(), b.iter_ones().count() as u64);
        }
    }
}
