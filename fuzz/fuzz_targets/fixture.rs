//! Any bytes given to `billrun load`: parsing and validation either accept the document or refuse
//! it with a message naming where; they never panic. An accepted document validates the same way
//! twice (validation reads nothing but the document and what is known).
#![no_main]

use billrun::fixture::{parse_document, validate, Known};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(doc) = parse_document("fuzz.json", text) else { return };
    let first = validate(&doc, &Known::default());
    let second = validate(&doc, &Known::default());
    match (&first, &second) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => {
            assert_eq!(a.0, b.0);
            assert!(!a.0.is_empty());
        }
        _ => panic!("validation is not deterministic"),
    }
    if let Ok(batch) = first {
        let mut known = Known::default();
        known.absorb(&batch);
        // what a document loaded may be referred to by the next one; loading it again is refused
        if !batch.accounts.is_empty() || !batch.plans.is_empty() || !batch.resources.is_empty() || !batch.packages.is_empty() {
            assert!(validate(&doc, &known).is_err(), "the same ids twice are refused");
        }
    }
});
