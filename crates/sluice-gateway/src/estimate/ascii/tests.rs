use super::*;
use proptest::prelude::*;

/// The patterns the splitters walk, compiled as tiktoken compiles them.
static O200K_PATTERN: LazyLock<fancy_regex::Regex> = LazyLock::new(|| {
    fancy_regex::Regex::new(tiktoken_rs::O200K_BASE_PAT_STR).expect("o200k's pattern")
});
/// tiktoken-rs does not export cl100k's pattern; this is `cl100k_base()`'s.
const CL100K_PAT_STR: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";
static CL100K_PATTERN: LazyLock<fancy_regex::Regex> =
    LazyLock::new(|| fancy_regex::Regex::new(CL100K_PAT_STR).expect("cl100k's pattern"));

/// Both encodings: the fast path, tiktoken, and the pattern.
fn encodings() -> [(&'static Fast, &'static fancy_regex::Regex); 2] {
    [(&*O200K, &*O200K_PATTERN), (&*CL100K, &*CL100K_PATTERN)]
}

fn tiktoken(fast: &Fast, s: &str) -> u64 {
    fast.bpe.encode_with_special_tokens(s).len() as u64
}

/// The pieces of an ASCII text.
fn pieces<'a>(fast: &Fast, text: &'a str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut p = 0;
    while p < text.len() {
        let end = (fast.piece)(text.as_bytes(), p);
        assert!(end > p, "no progress at {p} in {text:?}");
        out.extend(text.get(p..end));
        p = end;
    }
    out
}

/// Texts made of bytes and words that meet every branch: capitals and small
/// letters (those of the contractions among them), the apostrophe, digits,
/// each kind of whitespace, `/`, other symbols, control bytes, and `<|`.
fn tricky() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "a",
        "b",
        "z",
        "A",
        "B",
        "Z",
        "s",
        "S",
        "t",
        "T",
        "r",
        "R",
        "e",
        "E",
        "v",
        "V",
        "m",
        "M",
        "l",
        "L",
        "d",
        "D",
        "'",
        "0",
        "1",
        "9",
        " ",
        " ",
        "\t",
        "\n",
        "\r",
        "\x0b",
        "\x0c",
        "/",
        "!",
        ".",
        ",",
        "(",
        ")",
        "{",
        "}",
        "\"",
        "\\",
        "-",
        "_",
        "=",
        "#",
        "<",
        ">",
        "|",
        "\x00",
        "\x1f",
        "\x7f",
        "<|",
        "<|endoftext|>",
        "Hello",
        "world",
        "DON'T",
        "it's",
        "12345",
        "    ",
        "\r\n",
        "//",
        " '",
        "'ll",
        "'Re",
    ]);
    prop::collection::vec(pieces, 0..48).prop_map(|v| v.concat())
}

/// Any ASCII, bytes drawn evenly.
fn any_ascii() -> impl Strategy<Value = String> {
    "[\\x00-\\x7f]{0,80}"
}

/// ASCII with non-ASCII characters among it: letters of every case class
/// (titlecase, modifier, other), a combining mark, digits and numbers of
/// other scripts, Unicode whitespace and line separators, punctuation, emoji.
fn mixed() -> impl Strategy<Value = String> {
    let odd = prop::sample::select(vec![
        "é", "É", "ß", "ǅ", "ʰ", "日本", "\u{301}", "١", "Ⅻ", "\u{a0}", "\u{3000}", "\u{2028}",
        "\u{85}", "’", "“", "—", "🦀", "ﬁ", "café", "ïve", "über",
    ]);
    prop::collection::vec(
        prop_oneof![3 => tricky(), 1 => odd.prop_map(str::to_owned)],
        0..12,
    )
    .prop_map(|v| v.concat())
}

fn check_pieces(text: &str) -> Result<(), TestCaseError> {
    for (fast, pattern) in encodings() {
        let want: Vec<&str> = pattern
            .find_iter(text)
            .map(|m| m.expect("a match").as_str())
            .collect();
        prop_assert_eq!(pieces(fast, text), want, "{:?}", text);
    }
    Ok(())
}

fn check_counts(text: &str) -> Result<(), TestCaseError> {
    for (fast, _) in encodings() {
        match fast.count(text) {
            Some(n) => prop_assert_eq!(n, tiktoken(fast, text), "{:?}", text),
            None => prop_assert!(text.contains("<|"), "{:?}", text),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4_096))]
    /// The pieces are the pattern's matches, one for one.
    #[test]
    fn pieces_are_the_patterns_matches(text in tricky()) {
        check_pieces(&text)?;
    }

    /// The count is tiktoken's, or `None` only for what it must decline.
    #[test]
    fn counts_are_tiktokens(text in tricky()) {
        check_counts(&text)?;
    }

    #[test]
    fn any_ascii_is_split_and_counted_as_tiktoken_does(text in any_ascii()) {
        check_pieces(&text)?;
        check_counts(&text)?;
    }

    /// Cut at word ends around non-ASCII bytes, the count is still tiktoken's.
    #[test]
    fn text_with_non_ascii_counts_as_tiktoken_counts_it(text in mixed()) {
        check_counts(&text)?;
    }
}

/// Long runs (pieces past [`LONG_PIECE`], and the edges around it) and
/// every line and whole file of this crate's sources (some non-ASCII).
#[test]
fn long_runs_and_real_text_count_as_tiktoken_counts_them() {
    let mut texts = Vec::new();
    for unit in [
        "a", "A", "=", " ", "\n", "\r\n", "1", "ab", "Ab", "aB", "'s", "/", " -", "\t ", "xY'LL",
    ] {
        for k in [49, 50, 99, 100, 101, 300, 3000] {
            texts.push(unit.repeat(k));
            texts.push(format!("x {} y", unit.repeat(k)));
        }
    }
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for entry in std::fs::read_dir(src).into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        texts.extend(text.lines().map(str::to_owned));
        texts.push(text);
    }
    assert!(texts.len() > 1_000, "the sources were not read");
    for (fast, _) in encodings() {
        let mut checked = 0;
        for t in &texts {
            if let Some(n) = fast.count(t) {
                assert_eq!(n, tiktoken(fast, t), "{:?}", &t[..t.len().min(120)]);
                checked += 1;
            }
        }
        assert!(checked > 1_000);
    }
}

#[test]
fn only_text_that_may_hold_a_special_token_is_declined() {
    for (fast, _) in encodings() {
        // A word with a non-ASCII letter after the first odd byte: no cut inside it.
        for t in [
            "héllo",
            "naïve café",
            "é café au lait",
            "日本語",
            "It’s “quoted” — 🦀",
            "a\u{301}b c",
        ] {
            assert_eq!(fast.count(t), Some(tiktoken(fast, t)), "{t}");
        }
        assert_eq!(fast.count("a <|endoftext|> b"), None);
        assert_eq!(fast.count("a <| b"), None);
        assert_eq!(fast.count(""), Some(0));
        assert_eq!(
            fast.count("Hello, world!"),
            Some(tiktoken(fast, "Hello, world!"))
        );
    }
    assert!(of(tiktoken_rs::p50k_base_singleton()).is_none());
}
