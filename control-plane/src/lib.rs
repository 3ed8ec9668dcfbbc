//! Trellis control plane. Built under the control-plane issue; the data plane's snapshot schema it
//! will push lives in `trellis-proto`.
