//! tiktoken's token counts of ASCII text, without tiktoken's regex.
//!
//! tiktoken splits a text into pieces with a regular expression (fancy-regex:
//! backtracking, Unicode classes) and then merges each piece's bytes into
//! tokens. On a fresh prompt the regex is most of the time. On ASCII text the
//! two patterns Sluice counts with (o200k_base's and cl100k_base's) reduce to
//! a few byte classes, so [`o200k_piece`] and [`cl100k_piece`] walk them by
//! hand, alternative by alternative, and the merging is tiktoken's own
//! (`byte_pair_split` over the same ranks). The counts are tiktoken's
//! exactly: the tests (`ascii/tests.rs`) compare the pieces with the
//! pattern's matches and the counts with tiktoken's, on generated texts built
//! to meet every alternative, on any ASCII, on long runs and on this crate's
//! sources. Text with non-ASCII bytes is cut at word ends around them and
//! only those parts go to tiktoken ([`Fast::count`]); text holding `<|`
//! (where a special token may start) is declined (`None`) and goes to
//! tiktoken whole.
//!
//! On ASCII: `\p{Lu}` is `A-Z`, `\p{Ll}` is `a-z`, `\p{L}` both; `\p{Lt}`,
//! `\p{Lm}`, `\p{Lo}` and `\p{M}` are empty; `\p{N}` is `0-9`; `\s` is tab,
//! line feed, vertical tab, form feed, carriage return and space.

use std::sync::LazyLock;

use rustc_hash::FxHashMap;
use tiktoken_rs::CoreBPE;

#[cfg(test)]
mod tests;

/// Pieces this long or longer go to tiktoken whole (it merges them with a
/// heap, not the quadratic scan `byte_pair_split` uses; a piece is a match of
/// the pattern, so tiktoken splits it alone into the same single piece).
const LONG_PIECE: usize = 100;

/// One encoding's fast path: its ordinary tokens by their bytes and its pattern.
pub(super) struct Fast {
    bpe: &'static CoreBPE,
    ranks: FxHashMap<Vec<u8>, tiktoken_rs::Rank>,
    /// Where the piece that starts at `p` (< the text's length) ends.
    piece: fn(&[u8], usize) -> usize,
}

static O200K: LazyLock<Fast> =
    LazyLock::new(|| Fast::new(tiktoken_rs::o200k_base_singleton(), o200k_piece));
static CL100K: LazyLock<Fast> =
    LazyLock::new(|| Fast::new(tiktoken_rs::cl100k_base_singleton(), cl100k_piece));

/// The fast path of `bpe`, if it has one (o200k_base and cl100k_base). The
/// first call for an encoding builds its rank map (about 0.1 s).
pub(super) fn of(bpe: &'static CoreBPE) -> Option<&'static Fast> {
    if std::ptr::eq(bpe, tiktoken_rs::o200k_base_singleton()) {
        Some(&*O200K)
    } else if std::ptr::eq(bpe, tiktoken_rs::cl100k_base_singleton()) {
        Some(&*CL100K)
    } else {
        None
    }
}

impl Fast {
    fn new(bpe: &'static CoreBPE, piece: fn(&[u8], usize) -> usize) -> Fast {
        // tiktoken keeps its encoder private: read the ordinary tokens back
        // from its decoder. Ranks are dense from 0; special tokens sit a
        // little past the ordinary ones, with gaps. Stop after a long run of
        // ranks that decode to nothing.
        let specials = bpe.special_tokens();
        let mut ranks = FxHashMap::default();
        let (mut rank, mut misses) = (0, 0);
        while misses < 1_000 {
            match bpe.decode_bytes(&[rank]) {
                Ok(bytes) if !std::str::from_utf8(&bytes).is_ok_and(|s| specials.contains(s)) => {
                    misses = 0;
                    ranks.insert(bytes, rank);
                }
                _ => misses += 1,
            }
            rank += 1;
        }
        Fast { bpe, ranks, piece }
    }

    /// The tokens `text` is (as `encode_with_special_tokens` counts them),
    /// or `None` when it holds `<|` (where a special token may start).
    ///
    /// Text that is not all ASCII is cut at word ends (an ASCII letter, then
    /// an ASCII byte that is neither a letter nor an apostrophe: [`word_end`]):
    /// no piece of either pattern runs across one, and no piece before one
    /// depends on what follows it, so the pieces of the parts are the pieces
    /// of the whole. The parts between the word ends around each non-ASCII
    /// byte go to tiktoken, the rest is walked here.
    pub(super) fn count(&self, text: &str) -> Option<u64> {
        let s = text.as_bytes();
        if memchr::memmem::find(s, b"<|").is_some() {
            return None;
        }
        let mut tokens = 0;
        let mut start = 0;
        while let Some(i) = s[start..].iter().position(|c| !c.is_ascii()) {
            let odd = start + i;
            let from = (start + 1..odd)
                .rev()
                .find(|&b| word_end(s, b))
                .unwrap_or(start);
            let to = (odd + 1..s.len())
                .find(|&b| word_end(s, b))
                .unwrap_or(s.len());
            // Word ends sit before ASCII bytes: char boundaries.
            tokens += self.walk(text.get(start..from)?);
            tokens += self.bpe.encode_ordinary(text.get(from..to)?).len() as u64;
            start = to;
        }
        Some(tokens + self.walk(text.get(start..)?))
    }

    /// The tokens of an ASCII `text`, piece by piece.
    fn walk(&self, text: &str) -> u64 {
        let s = text.as_bytes();
        let mut tokens = 0;
        let mut p = 0;
        while p < s.len() {
            let end = (self.piece)(s, p);
            let piece = &s[p..end];
            tokens += if piece.len() < 2 || self.ranks.contains_key(piece) {
                1
            } else if piece.len() >= LONG_PIECE {
                // ASCII: every byte offset is a char boundary.
                text.get(p..end)
                    .map_or(0, |t| self.bpe.encode_ordinary(t).len() as u64)
            } else {
                tiktoken_rs::byte_pair_split(piece, &self.ranks).len() as u64
            };
            p = end;
        }
        tokens
    }
}

/// Whether `b` (inside `s`) follows an ASCII letter and holds an ASCII byte
/// that is neither a letter nor an apostrophe. In both patterns a letter
/// can be followed within its piece only by letters, marks or a
/// contraction's apostrophe, so a piece ends at `b`; and the pieces before
/// `b` do not look past it (the only lookahead, `\s+(?!\S)`, ends runs of
/// whitespace, and the byte before `b` is a letter).
fn word_end(s: &[u8], b: usize) -> bool {
    let (before, at) = (s[b - 1], s[b]);
    before.is_ascii_alphabetic() && at.is_ascii() && !at.is_ascii_alphabetic() && at != b'\''
}

fn upper(c: u8) -> bool {
    c.is_ascii_uppercase()
}

fn lower(c: u8) -> bool {
    c.is_ascii_lowercase()
}

fn letter(c: u8) -> bool {
    c.is_ascii_alphabetic()
}

fn digit(c: u8) -> bool {
    c.is_ascii_digit()
}

/// `\s`.
fn space(c: u8) -> bool {
    matches!(c, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ')
}

fn newline(c: u8) -> bool {
    c == b'\r' || c == b'\n'
}

/// `[^\r\n\p{L}\p{N}]`: neither a letter, a digit nor a line break.
fn lead(c: u8) -> bool {
    !c.is_ascii_alphanumeric() && !newline(c)
}

/// `[^\s\p{L}\p{N}]`: neither a letter, a digit nor whitespace.
fn symbol(c: u8) -> bool {
    !c.is_ascii_alphanumeric() && !space(c)
}

/// The end of a run of `class` bytes from `i`.
fn run(s: &[u8], mut i: usize, class: fn(u8) -> bool) -> usize {
    while s.get(i).is_some_and(|&c| class(c)) {
        i += 1;
    }
    i
}

/// The end of `'(?i:s|t|re|ve|m|ll|d)` at `i`, or `i` when none is there.
fn contraction(s: &[u8], i: usize) -> usize {
    if s.get(i) != Some(&b'\'') {
        return i;
    }
    let at = |k: usize| s.get(i + k).map(u8::to_ascii_lowercase);
    match (at(1), at(2)) {
        (Some(b's' | b't' | b'm' | b'd'), _) => i + 2,
        (Some(b'r' | b'v'), Some(b'e')) | (Some(b'l'), Some(b'l')) => i + 3,
        _ => i,
    }
}

/// The end of ` ?[^\s\p{L}\p{N}]+` at `p`, or `p` when it does not match.
fn symbols(s: &[u8], p: usize) -> usize {
    // Without the space, the run would have to start at the space.
    let from = if s[p] == b' ' { p + 1 } else { p };
    let end = run(s, from, symbol);
    if end > from { end } else { p }
}

/// Where a run of whitespace from `p` (to `end`, which is not the text's
/// end) ends as a piece when it holds no line break: all but its last byte
/// (`\s+(?!\S)`), or its one byte.
fn spaces_before_text(p: usize, end: usize) -> usize {
    if end - p >= 2 { end - 1 } else { p + 1 }
}

/// `\s*[\r\n]` (cl100k) and `\s*[\r\n]+` (o200k) at `p`: `\s*` gives back
/// bytes until a line break can follow, so the piece ends after the last line
/// break of the whitespace run `p..end`.
fn through_last_newline(s: &[u8], p: usize, end: usize) -> Option<usize> {
    s[p..end]
        .iter()
        .rposition(|&c| newline(c))
        .map(|last| p + last + 1)
}

/// o200k_base's pattern (`tiktoken_rs::O200K_BASE_PAT_STR`), on ASCII:
/// 1. `[^\r\n\p{L}\p{N}]?[\p{Lu}…]*[\p{Ll}…]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?`
/// 2. `[^\r\n\p{L}\p{N}]?[\p{Lu}…]+[\p{Ll}…]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?`
/// 3. `\p{N}{1,3}`
/// 4. ` ?[^\s\p{L}\p{N}]+[\r\n/]*`
/// 5. `\s*[\r\n]+`
/// 6. `\s+(?!\S)`
/// 7. `\s+`
fn o200k_piece(s: &[u8], p: usize) -> usize {
    let c = s[p];
    // 1 and 2. The optional first byte is taken when it can be (greedy); a
    // match without it would have to start with a letter, which it is not.
    let start = if lead(c) { p + 1 } else { p };
    let uppers = run(s, start, upper);
    let lowers = run(s, uppers, lower);
    // 1 needs a lowercase letter after the capitals, 2 a capital (and then
    // takes no lowercase, or 1 would have matched).
    if lowers > uppers || uppers > start {
        return contraction(s, lowers);
    }
    if digit(c) {
        return run(s, p, digit).min(p + 3);
    }
    let end = symbols(s, p);
    if end > p {
        return run(s, end, |c| newline(c) || c == b'/');
    }
    // From here `c` is whitespace.
    let end = run(s, p, space);
    if let Some(end) = through_last_newline(s, p, end) {
        return end;
    }
    // 6 takes a run at the end of the text whole.
    if end == s.len() {
        return end;
    }
    // 6, or 7 for one byte before a non-space.
    spaces_before_text(p, end)
}

/// cl100k_base's pattern (tiktoken-rs's `cl100k_base`), on ASCII:
/// 1. `'(?i:[sdmt]|ll|ve|re)`
/// 2. `[^\r\n\p{L}\p{N}]?+\p{L}++`
/// 3. `\p{N}{1,3}+`
/// 4. ` ?[^\s\p{L}\p{N}]++[\r\n]*+`
/// 5. `\s++$`
/// 6. `\s*[\r\n]`
/// 7. `\s+(?!\S)`
/// 8. `\s`
fn cl100k_piece(s: &[u8], p: usize) -> usize {
    let c = s[p];
    let end = contraction(s, p);
    if end > p {
        return end;
    }
    // 2. The optional first byte is possessive: once taken it is not given
    // back, and without it the letters would have to start at `c`, not one.
    let start = if lead(c) { p + 1 } else { p };
    let letters = run(s, start, letter);
    if letters > start {
        return letters;
    }
    if digit(c) {
        return run(s, p, digit).min(p + 3);
    }
    let end = symbols(s, p);
    if end > p {
        return run(s, end, newline);
    }
    // From here `c` is whitespace.
    let end = run(s, p, space);
    if end == s.len() {
        return end;
    }
    if let Some(end) = through_last_newline(s, p, end) {
        return end;
    }
    spaces_before_text(p, end)
}
