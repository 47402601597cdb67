//! Tests of plan parsing and validation.
