//! Money arithmetic: exact decimal, list amounts rounded half-up to 8 places, amounts due truncated
//! toward zero to cents. Computed on i128 integers so no intermediate rounding can creep in.

use rust_decimal::Decimal;

/// Decimal places of a line's `list_amount`.
pub const LIST_DP: u32 = 8;
/// Decimal places of money that moves a balance.
pub const CENT_DP: u32 = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("amount out of range: {0}")]
pub struct Overflow(pub String);

/// `product(factors) / divisor`, rounded half away from zero to `LIST_DP` places, exactly.
pub fn mul_div_round(factors: &[Decimal], divisor: i64) -> Result<Decimal, Overflow> {
    let overflow = || Overflow(format!("{factors:?} / {divisor}"));
    let mut mantissa: i128 = 1;
    let mut scale: u32 = 0;
    for f in factors {
        mantissa = mantissa.checked_mul(f.mantissa()).ok_or_else(overflow)?;
        scale += f.scale();
    }
    // value = mantissa / 10^scale / divisor; we want units of 10^-LIST_DP.
    let (numerator, denominator) = if scale <= LIST_DP {
        let up = 10i128.checked_pow(LIST_DP - scale).ok_or_else(overflow)?;
        (mantissa.checked_mul(up).ok_or_else(overflow)?, divisor as i128)
    } else {
        let down = 10i128.checked_pow(scale - LIST_DP).ok_or_else(overflow)?;
        (mantissa, (divisor as i128).checked_mul(down).ok_or_else(overflow)?)
    };
    let units = div_round_half_away(numerator, denominator);
    Decimal::try_from_i128_with_scale(units, LIST_DP).map_err(|_| overflow())
}

fn div_round_half_away(n: i128, d: i128) -> i128 {
    let q = n / d;
    let r = n % d;
    if 2 * r.abs() >= d.abs() {
        if (n < 0) != (d < 0) {
            q - 1
        } else {
            q + 1
        }
    } else {
        q
    }
}

/// List amount of a metered line: hourly price x quantity x seconds / 3600.
pub fn usage_list_amount(hourly_price: Decimal, quantity: Decimal, seconds: i64) -> Result<Decimal, Overflow> {
    mul_div_round(&[hourly_price, quantity, Decimal::from(seconds)], 3600)
}

/// What a balance moves by: the list amount truncated toward zero to cents.
pub fn amount_due(list_amount: Decimal) -> Decimal {
    let mut d = list_amount.trunc_with_scale(CENT_DP);
    d.rescale(CENT_DP);
    d
}

/// Money for output: exactly two decimals.
pub fn fmt_cents(d: Decimal) -> String {
    let mut d = d;
    d.rescale(CENT_DP);
    d.to_string()
}

/// A list amount or price for output: as many decimals as it needs, at least two.
pub fn fmt_amount(d: Decimal) -> String {
    let mut d = d.normalize();
    if d.scale() < CENT_DP {
        d.rescale(CENT_DP);
    }
    d.to_string()
}

/// A quantity or price for output: plain number, no trailing zeros.
pub fn fmt_plain(d: Decimal) -> String {
    d.normalize().to_string()
}

/// How a stored amount is shown in the CSV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shown {
    /// `fmt_cents`
    Cents,
    /// `fmt_amount`
    Amount,
    /// `fmt_plain`
    Plain,
}

/// A stored decimal text (as the database returns it) shown as `fmt_cents`/`fmt_amount`/
/// `fmt_plain` would show its value, without parsing it when the text is already in the canonical
/// form a decimal prints as (`-?(0|[1-9][0-9]*)\.[0-9]+`, not a negative zero): then only trailing
/// zeros are cut or kept. Anything else goes through `Decimal`. The export's hot path.
pub fn show_stored(text: &str, how: Shown) -> Result<std::borrow::Cow<'_, str>, String> {
    use std::borrow::Cow;
    if let Some(frac) = canonical_fraction(text) {
        let keep = match how {
            Shown::Cents if frac.len() == CENT_DP as usize => return Ok(Cow::Borrowed(text)),
            Shown::Cents => None,
            Shown::Amount => Some(frac.trim_end_matches('0').len().max(CENT_DP as usize)),
            Shown::Plain => Some(frac.trim_end_matches('0').len()),
        };
        if let Some(keep) = keep.filter(|&k| k <= frac.len()) {
            let cut = frac.len() - keep + usize::from(keep == 0); // the point goes with the last digit
            return Ok(Cow::Borrowed(&text[..text.len() - cut]));
        }
    }
    let d: Decimal = text.parse().map_err(|_| format!("a stored amount {text:?} is not a decimal"))?;
    Ok(Cow::Owned(match how {
        Shown::Cents => fmt_cents(d),
        Shown::Amount => fmt_amount(d),
        Shown::Plain => fmt_plain(d),
    }))
}

/// The digits after the point when `text` is `-?(0|[1-9][0-9]*)\.[0-9]+` and not a negative zero.
fn canonical_fraction(text: &str) -> Option<&str> {
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    let (int, frac) = unsigned.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || !digits(frac) || (int.len() > 1 && int.starts_with('0')) {
        return None;
    }
    let zero = int == "0" && frac.bytes().all(|b| b == b'0');
    if zero && unsigned.len() != text.len() {
        return None;
    }
    Some(frac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn koophone_examples() {
        // 30 s at 0.36/h: list 0.003, due 0.00, truncated 0.003
        let l = usage_list_amount(d("0.36"), d("1"), 30).unwrap();
        assert_eq!(l, d("0.003"));
        assert_eq!(fmt_cents(amount_due(l)), "0.00");
        assert_eq!(l - amount_due(l), d("0.003"));
        // 2,746 s at 0.36/h = 0.2746
        assert_eq!(usage_list_amount(d("0.36"), d("1"), 2746).unwrap(), d("0.2746"));
        // 0.72/h x 2 x 2,385 s / 3600 = 0.954
        let l = usage_list_amount(d("0.72"), d("2"), 2385).unwrap();
        assert_eq!(l, d("0.954"));
        assert_eq!(amount_due(l), d("0.95"));
    }

    #[test]
    fn rounds_half_up_at_eight_places() {
        // 0.0001 x 1 x 1 / 3600 = 0.0000000277.. -> 0.00000003
        assert_eq!(usage_list_amount(d("0.0001"), d("1"), 1).unwrap(), d("0.00000003"));
        // 0.00000018 / 3600 x 100 = 0.000000005 exactly: a midpoint, rounds up
        assert_eq!(mul_div_round(&[d("0.00018")], 36000).unwrap(), d("0.00000001"));
        assert_eq!(mul_div_round(&[d("0.00017")], 36000).unwrap(), d("0.00000000"));
        assert_eq!(mul_div_round(&[d("-0.00018")], 36000).unwrap(), d("-0.00000001"));
    }

    #[test]
    fn truncates_toward_zero() {
        assert_eq!(amount_due(d("0.999")), d("0.99"));
        assert_eq!(amount_due(d("-0.999")), d("-0.99"));
        assert_eq!(fmt_cents(d("5")), "5.00");
        assert_eq!(fmt_amount(d("0.00300000")), "0.003");
        assert_eq!(fmt_amount(d("1.00000000")), "1.00");
    }

    #[test]
    fn stored_text_shown_like_its_value() {
        let show = |t: &str, h: Shown| show_stored(t, h).unwrap().into_owned();
        assert_eq!(show("1.08000000", Shown::Amount), "1.08");
        assert_eq!(show("0.00300000", Shown::Amount), "0.003");
        assert_eq!(show("0.00000000", Shown::Amount), "0.00");
        assert_eq!(show("1.00", Shown::Plain), "1");
        assert_eq!(show("0.36", Shown::Plain), "0.36");
        assert_eq!(show("-0.27", Shown::Cents), "-0.27");
        assert_eq!(show("5", Shown::Cents), "5.00");
        assert_eq!(show("1e2", Shown::Plain), "100");
        assert!(show_stored("NaN", Shown::Cents).is_err());
    }

    proptest! {
        /// Whatever text a decimal is stored as (its own printing, or another scale), the shown
        /// form equals the one of the parsed value.
        #[test]
        fn stored_fast_path_equals_the_decimal_path(m in -10_000_000_000i64..10_000_000_000, scale in 0u32..12, pad in 0usize..4) {
            let d = Decimal::new(m, scale);
            let mut text = d.to_string();
            if pad > 0 {
                if !text.contains('.') { text.push('.'); }
                text.push_str(&"0".repeat(pad));
            }
            let parsed: Decimal = text.parse().unwrap();
            prop_assert_eq!(show_stored(&text, Shown::Cents).unwrap(), fmt_cents(parsed));
            prop_assert_eq!(show_stored(&text, Shown::Amount).unwrap(), fmt_amount(parsed));
            prop_assert_eq!(show_stored(&text, Shown::Plain).unwrap(), fmt_plain(parsed));
        }

        #[test]
        fn exact_against_integer_reference(p in 0i64..100_000_000, q in 1i64..10_000, s in 0i64..=3600) {
            // price with 4 decimals, integer quantity: exact value in 1e-8 units = p*q*s*10^4/3600
            let price = Decimal::new(p, 4);
            let got = usage_list_amount(price, Decimal::from(q), s).unwrap();
            let num = p as i128 * q as i128 * s as i128 * 10_000;
            let want = (2 * num + 3600) / 7200; // half-up for non-negatives
            prop_assert_eq!(got, Decimal::from_i128_with_scale(want, 8));
            let due = amount_due(got);
            prop_assert!(due <= got && got - due < d("0.01"));
        }
    }
}
