//! Terraform (HCL): `aws_appmesh_*` resources, with variables, locals and the references between
//! them resolved.

use super::{Read, ReadError};

/// Reads the `.tf` files of one module together (references cross files): (name, text) pairs.
pub fn read(files: &[(String, String)]) -> Result<Read, ReadError> {
    Err(ReadError {
        source_name: files.first().map(|f| f.0.clone()).unwrap_or_default(),
        reason: "Terraform import is not implemented yet".into(),
    })
}
