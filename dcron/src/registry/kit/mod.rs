//! What every backend shares, written once: the claim algorithm over a
//! compare-and-set ([`cas`]), the sending side of a watch feed ([`feed`]),
//! the key layout and name checks ([`keys`]) and the options every builder
//! takes ([`options`]). A backend folder holds only its protocol.

pub(crate) mod cas;
pub(crate) mod feed;
pub(crate) mod keys;
pub(crate) mod options;
