resource "aws_appmesh_mesh" "m" {
  name = "m"
}
resource "aws_appmesh_virtual_node" "a" {
  name = "a"
  mesh_name = aws_appmesh_mesh.m.id
  spec {
    listener {
      port_mapping {
        port = 80
        protocol = "http"
      }
    }
  }
}
