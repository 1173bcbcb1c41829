pub mod sam;
